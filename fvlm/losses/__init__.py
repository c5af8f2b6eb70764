"""Training objectives, chosen by name from the recipe: ``create_objective(name, **options)``.

Each objective is an ``nn.Module`` called as ``objective(**model_out, **batch)`` (unused keys ignored) that
returns a dict of named loss terms; the trainer sums the weighted terms the recipe names.

Registered: ``anatomy_contrastive`` (fVLM as released: same case, normal-normal and identical-text
positives), ``anatomy_infonce`` (the same with both calibrations off: plain per-anatomy InfoNCE, the
``fvlm-plain`` recipe), ``disease_aware`` (plus shared-finding positives, the paper's disease-aware
pairing), ``clip_global`` (whole scan vs whole report, the CT-CLIP baseline), ``region_contrastive`` (the ``region``
head's late-interaction similarity of a text's tokens and an anatomy's top-k regions, same targets),
``uncertainty_contrastive`` (Gaussian anatomy embeddings of the ``uncertainty`` head, 2-Wasserstein logits,
inter- and intra-modal terms, variance regulariser),
``label_unified`` (anatomy image vs label-sentence embeddings of the ``prompt_context`` head,
multi-positive targets from label agreement; label-only cases train through it), ``entity_mlm`` (weighted
masked-token cross-entropy of the ``entity_mlm`` head), ``guided_reconstruction`` (guide-weighted masked
voxel loss of the ``masked_reconstruction`` head), ``supervised`` (masked binary cross-entropy of the
``task_classifier`` head's per-anatomy task logits against the labels: the supervised ceiling, not a
vision-language objective).
"""

from fvlm.losses.registry import create_objective, list_objectives, objective_defaults, register_objective
from fvlm.losses.anatomy import AnatomyContrastive, DiseaseAware  # noqa: E402  (registers)
from fvlm.losses.clip import ClipGlobal  # noqa: E402  (registers)
from fvlm.losses.unified import LabelUnified  # noqa: E402  (registers)
from fvlm.losses.region import RegionContrastive  # noqa: E402  (registers)
from fvlm.losses.uncertainty import UncertaintyContrastive  # noqa: E402  (registers)
from fvlm.losses.entity import EntityMLM  # noqa: E402  (registers)
from fvlm.losses.reconstruct import GuidedReconstruction  # noqa: E402  (registers)
from fvlm.losses.supervised import Supervised  # noqa: E402  (registers)

__all__ = [
    "create_objective",
    "list_objectives",
    "objective_defaults",
    "register_objective",
    "AnatomyContrastive",
    "DiseaseAware",
    "ClipGlobal",
    "LabelUnified",
    "RegionContrastive",
    "UncertaintyContrastive",
    "EntityMLM",
    "GuidedReconstruction",
    "Supervised",
]
