"""Model bundles: :func:`train_bundle` fits a model and writes it; :func:`load_bundle` reads it back, checked."""
from histomoe_core.bundle.fit import TrainRequest, train_bundle
from histomoe_core.bundle.format import Bundle, BundleError, load_bundle, read_manifest, save_bundle

__all__ = ["Bundle", "BundleError", "TrainRequest", "load_bundle", "read_manifest", "save_bundle", "train_bundle"]
