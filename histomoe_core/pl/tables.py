"""Tables as a page shows them: rounded, without ``-0.0``, and with words in the cells that have no value."""
from __future__ import annotations

import pandas as pd


def shown(table: pd.DataFrame, *, digits: int = 3, missing: str = "") -> pd.DataFrame:
    """``table`` as a page shows it: every float cell written with ``digits`` decimals (a column reads ``0.190``
    beside ``0.348``; a value that rounds to zero reads ``0.000``, never ``-0.000``) and ``missing`` in every
    empty cell (a page would print ``NaN``). Other columns are kept as they are; the input is not modified."""
    out = table.copy()
    for col in out.columns[[pd.api.types.is_float_dtype(t) for t in out.dtypes]]:
        out[col] = [missing if pd.isna(v) else f"{round(float(v), digits) + 0.0:.{digits}f}" for v in out[col]]
    return out.astype(object).where(out.notna(), missing)
