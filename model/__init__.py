"""The DIML model library: backbones, embedding head, structural matching, explanations.

Pure torch (torchvision only for training augmentations): no web, no FAISS.
"""

from model.backbones import Backbone, BackboneWeightsError, FeatureInfo, create_backbone
from model.checkpoint import (
    CheckpointError,
    fingerprint,
    load_checkpoint,
    load_model,
    read_config,
    save_checkpoint,
)
from model.config import MatchingConfig, ModelConfig, Preprocessing
from model.decoding import configure_decoders, load_image, to_rgb
from model.explain import Explanation, PartMatch, explain
from model.image_limits import ImageLoadError
from model.matching import (
    StructuralMatch,
    match_all,
    match_pairs,
    part_weights,
    structural_match,
)
from model.network import Embedding, EmbeddingHead, EmbeddingNet, create_model, default_config
from model.optimal_transport import SinkhornResult, sinkhorn
from model.pipeline import Embedder
from model.preprocessing import ImageGeometry, ModelInput, load_for_model, preprocess
from model.render import render_explanation

__all__ = [
    "Backbone",
    "BackboneWeightsError",
    "CheckpointError",
    "Embedder",
    "Embedding",
    "EmbeddingHead",
    "EmbeddingNet",
    "Explanation",
    "FeatureInfo",
    "ImageGeometry",
    "ImageLoadError",
    "MatchingConfig",
    "ModelConfig",
    "ModelInput",
    "PartMatch",
    "Preprocessing",
    "SinkhornResult",
    "StructuralMatch",
    "configure_decoders",
    "create_backbone",
    "create_model",
    "default_config",
    "explain",
    "fingerprint",
    "load_checkpoint",
    "load_for_model",
    "load_image",
    "load_model",
    "match_all",
    "match_pairs",
    "part_weights",
    "preprocess",
    "read_config",
    "render_explanation",
    "save_checkpoint",
    "sinkhorn",
    "structural_match",
    "to_rgb",
]
