"""What each sanity flag of `advtrain.flags` means, in words, for the reports to carry inline.

A report folder is read where it was copied to (a bucket, a laptop), without the advtrain
sources, so the reports cannot link docs/flags.md: they carry the section `flags_markdown`
writes, and link its anchors (`#<flag id>`, the GitHub slug of each `### <flag id>` heading,
which `advtrain.page` gives the same id). The text is docs/flags.md's, shortened; its budgets
are `advtrain.flags`'. No TensorFlow here (`advtrain.flags` imports it), so `advtrain report`
stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FLAG_TEXT", "HEADING", "flag_link", "flags_markdown"]

HEADING = "What the flags mean"
# The GitHub slug of HEADING, and the id `advtrain.page` gives it.
ANCHOR = "what-the-flags-mean"

# id -> (raised if, why it matters). Same ids and order as `advtrain.flags.FLAG_IDS`.
FLAG_TEXT: dict[str, tuple[str, str]] = {
    "robust-le-clean": (
        (
            "robust accuracy (the per-example worst case over the suite) is larger than clean "
            "accuracy."
        ),
        (
            "An attack can only turn correct predictions into wrong ones, so this means the "
            "evaluation's bookkeeping is broken (e.g. an adversarial input scored against the "
            "wrong label). No tolerance."
        ),
    ),
    "pgd-le-fgsm": (
        (
            "the suite's first iterative attack, or its worst case, leaves more accuracy than one "
            "FGSM step, beyond the noise tolerance."
        ),
        (
            "Many projected steps from a random start should find at least what one step finds. "
            "If not, the attack is broken (step size, sign, projection) or the model masks its "
            "gradients; either way the robust number is an overestimate."
        ),
    ),
    "more-steps": (
        (
            "on the subsample, PGD-40 or PGD-10 with 4 restarts leaves more accuracy than PGD-10, "
            "beyond the noise tolerance."
        ),
        (
            "More effort can only make a correct attack stronger. A rise points to an attack that "
            "does not converge, or to a stochastic model: the number is not a worst case."
        ),
    ),
    "eps-monotone": (
        (
            "in an eps sweep, robust accuracy at a larger eps is higher than at a smaller one, "
            "beyond the noise tolerance. Not run with a single eps."
        ),
        (
            "A larger eps-ball contains the smaller one, so the true robust accuracy can only "
            "fall as eps grows: a rise means a step-size or projection bug, or gradient masking."
        ),
    ),
    "large-eps": (
        "PGD-50 on the subsample leaves more than 5% accuracy at a huge radius (linf 0.5, l2 6.0).",
        (
            "No classifier can stay accurate in such a ball, so a working gradient attack must "
            "drive accuracy to about zero. High accuracy means the attack cannot follow the "
            "model's gradients: saturated or vanishing gradients, non-differentiable "
            "preprocessing, or a broken attack."
        ),
    ),
    "whitebox-vs-transfer": (
        (
            "PGD-20 crafted on an independent reference model and transferred leaves less "
            "accuracy than the white-box suite, beyond the noise tolerance. Not run without a "
            "reference model."
        ),
        (
            "A white-box attacker knows the model's gradients; if a transfer attack does better, "
            "those gradients are uninformative (gradient masking) and the robust accuracy is an "
            "illusion."
        ),
    ),
    "whitebox-vs-noise": (
        (
            "uniform random noise in the eps-ball (10 draws per example) leaves less accuracy "
            "than the white-box suite, beyond the noise tolerance."
        ),
        (
            "Random noise is the weakest attack there is; an optimised attack doing worse is not "
            "using the gradient at all (zero, NaN, or pointing away from the boundary), or is "
            "broken."
        ),
    ),
    "gradient-free-gap": (
        (
            "the suite's gradient-free attack (Square), run last on what every gradient attack "
            "left, breaks more examples than the noise tolerance allows. Not run for suites "
            "without one."
        ),
        (
            "Square only queries outputs and is a weaker optimiser than a working gradient "
            "attack; when it finds many examples they missed, their gradients were uninformative. "
            "The number already includes what Square found, and is still only an upper bound."
        ),
    ),
    "zero-gradients": (
        (
            "more than 1% of the subsample has an all-zero or non-finite input gradient of the "
            "cross-entropy."
        ),
        (
            "Gradient attacks cannot move such examples, which then look robust without being so "
            "(saturated softmax, quantised or thresholded inputs, dead activations). The "
            "`standard` suite also runs attacks that need no such gradient (APGD-DLR, Square, "
            "BPDA where a layer loses it); its number is then the one to read, still an upper "
            "bound."
        ),
    ),
}


def flag_link(flag_id: str) -> str:
    """A Markdown link to the flag's explanation in the same report: `[large-eps](#large-eps)`."""
    return f"[{flag_id}](#{flag_id})" if flag_id in FLAG_TEXT else f"`{flag_id}`"


def flags_markdown(ids: Iterable[str] | None = None, level: int = 2) -> list[str]:
    """The "What the flags mean" section, as Markdown lines: one `###` heading per flag (its id,
    so `#<id>` links land on it), what raises it and why it matters.

    Args:
        ids: the flags to explain, in `FLAG_TEXT` order whatever the order given; unknown ids are
            left out. Defaults to every flag.
        level: the section heading's level (its flags one deeper). Defaults to 2.

    Returns:
        The lines, starting with the section heading; `[]` when no known flag is asked for.
    """
    wanted = set(FLAG_TEXT if ids is None else ids)
    chosen = [i for i in FLAG_TEXT if i in wanted]
    if not chosen:
        return []
    lines = [
        "#" * level + f" {HEADING}",
        "",
        (
            "A robust accuracy is the worst case over the attacks tried, so it is always an upper "
            "bound on the true one; a failed flag says the attacks may have been fooled. "
            "Accuracies are compared with a noise tolerance of max(1.5 sqrt(p (1 - p) / n), 1 / "
            "n); the subsample is the first min(n, 200) examples."
        ),
    ]
    for flag_id in chosen:
        raised, why = FLAG_TEXT[flag_id]
        # The long form is named for readers with the advtrain sources, not linked: the folder
        # travels without them.
        lines += [
            "",
            "#" * (level + 1) + f" {flag_id}",
            "",
            f"**Raised if** {raised}",
            "",
            f"{why} (Long form: `docs/flags.md#{flag_id}` in the advtrain sources.)",
        ]
    return lines
