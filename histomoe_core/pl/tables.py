"""Tables as a page shows them: rounded, without ``-0.0``, and with words in the cells that have no value."""
from __future__ import annotations

import pandas as pd


def shown(table: pd.DataFrame, *, digits: int = 3, missing: str = "") -> pd.DataFrame:
    """``table`` with its float columns rounded to ``digits`` (a value that rounds to zero shows ``0.0``, never
    ``-0.0``) and ``missing`` written in every empty cell (a page would print ``NaN``)."""
    out = table.copy()
    for col in out.columns[[pd.api.types.is_float_dtype(t) for t in out.dtypes]]:
        out[col] = out[col].round(digits) + 0.0  # -0.0 + 0.0 is 0.0
    return out.astype(object).where(out.notna(), missing)
