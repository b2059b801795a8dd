"""What an IG convergence table says, in words (the attributions chapter glues them)."""
from __future__ import annotations

import pandas as pd
from torch import nn

#: activations whose kinks a Gauss-Legendre rule does not integrate exactly
KINKED = ("ReLU", "ReLU6", "LeakyReLU", "Hardtanh")


def ig_trend(deltas: pd.Series) -> str:
    """How a relative IG delta moves from the fewest to the most steps: shrinks, grows or stays (within 2x)."""
    first, last = float(deltas.iloc[0]), float(deltas.iloc[-1])
    return "shrinks" if last <= first / 2 else "grows" if last >= 2 * first else "stays within a factor of two"


def ig_convergence(conv: pd.DataFrame, *, model: str, smooth_model: str | None, has_retrieval: bool,
                   retrieval_share: float, encoder: nn.Module, min_gap_share: float) -> tuple[str, str]:
    """``(trend, reason)``: the trend of ``model``'s column of ``conv`` (IG steps x model, largest relative delta)
    and the sentence that says what explains it, from what was measured (``retrieval_share``: the retrieval
    experts' largest share of the output change; ``min_gap_share``: the smallest output change relative to the
    output) and what the models are (a retrieval expert, the encoder's activations)."""
    trend = ig_trend(conv[model])
    smooth = ig_trend(conv[smooth_model]) if smooth_model else None
    if trend == "shrinks":
        return trend, "That is what the error of a numerical integral should do."
    if has_retrieval and smooth == "shrinks":
        return trend, (f"The model without retrieval does converge, so what stays in the delta of {model} is the "
                       f"retrieval experts' jumps (up to {retrieval_share:.0%} of the output change, table above), "
                       "which no number of steps removes.")
    if has_retrieval and not smooth_model:
        return trend, (f"The retrieval experts' jumps (up to {retrieval_share:.0%} of the output change, table "
                       "above) stay in the delta whatever the number of steps.")
    kinked = sorted({type(m).__name__ for m in encoder.modules()} & set(KINKED))
    not_retrieval = ("The model has no retrieval expert" if not has_retrieval else
                     f"The model without retrieval does not converge either ({smooth_model}: the delta {smooth})")
    kinks = (f"the kinks of the encoder's piecewise-linear activations ({', '.join(kinked)}), which Captum's "
             "default Gauss-Legendre rule does not integrate exactly, so more steps need not give a smaller error; "
             if kinked else "")
    return trend, (f"{not_retrieval}, so the retrieval part does not explain it. This chapter does not separate the "
                   f"remaining causes; candidates are {kinks}and float32 round-off in the sum over all pixels, which "
                   "weighs more when the output change it is divided by is small (down to "
                   f"{min_gap_share:.1%} of the output on these patches).")
