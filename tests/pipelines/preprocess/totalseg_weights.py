"""Tiny, randomly initialised nnU-Net v2 models laid out exactly as TotalSegmentator's ``total`` weights are,
so that the real inference path (TotalSegmentator's API -> nnU-Net's predictor -> fvlm's segmenter) runs
in seconds on a CPU without the real weights and without a network.

Layout, as TotalSegmentator 2.x looks for it (``totalsegmentator.libs.download_pretrained_weights``,
``totalsegmentator.nnunet.nnUNetv2_predict``, ``nnunetv2.inference.predict_from_raw_data``)::

    <weights root>/                                            # TOTALSEG_WEIGHTS_PATH = nnUNet_results
      Dataset297_TotalSegmentator_total_3mm_1559subj/          # TASK_ID_WEIGHTS_CONFIGS[297]["foldername"]
        nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
          plans.json                                           # nnU-Net plans, 3d_fullres configuration
          dataset.json                                         # channel_names, labels (the class map), ...
          fold_0/checkpoint_final.pth                          # network_weights, init_args, trainer_name, ...

Task ids, trainers and spacings are read from TotalSegmentator's own task table
(``map_tasks_config.TASK_CONFIGS["total"]``): ``fast`` is 297 (3 mm), ``fastest`` / the ``roi_subset`` crop
model is 298 (6 mm), the full-resolution ``total`` is the five part models 291-295 (1.5 mm). The labels of
297/298 are ``class_map["total"]``; those of a part model are its part's class map, which TotalSegmentator
maps back to ``total`` ids.

The plans use the nnU-Net 2.1-era format of the released v2.0.0 weights (``UNet_class_name``,
``n_conv_per_stage_encoder``, ... instead of an ``architecture`` block), which nnU-Net 2.6 converts on load;
the network is built here independently (``PlainConvUNet`` from dynamic-network-architectures with the
kwargs that conversion yields) so that a layout nnU-Net would not load fails ``load_state_dict`` (strict).
The content of the label maps these models produce is noise; geometry and plumbing are what they test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Encoder stages of the tiny network: features per stage and strides (3 stages, 4 -> 16 features).
FEATURES = (4, 8, 16)
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2))
PATCH_SIZE = (32, 64, 64)  # (Z, Y, X) in nnU-Net's (transposed) axis order; divisible by the total stride 4
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"


def total_task_table() -> dict[int, dict]:
    """Task id -> ``{"folder", "trainer", "spacing", "labels"}`` for TotalSegmentator's ``total`` models, read
    from TotalSegmentator's own tables (so a renamed folder or trainer in a new release shows up here)."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    table: dict[int, dict] = {}
    for mode in TASK_CONFIGS["total"]["sub_modes"].values():
        ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
        for tid in ids:
            info = TASK_ID_WEIGHTS_CONFIGS[tid]
            labels = class_map_5_parts[map_taskid_to_partname_ct[tid]] if tid in map_taskid_to_partname_ct \
                else class_map["total"]
            table[tid] = {
                "folder": str(Path(info.get("rel_path") or "") / info["foldername"]),
                "trainer": mode["trainer"],
                "spacing": float(mode["resample"]),
                "labels": dict(labels),
            }
    return table


def _plans(dataset_name: str, spacing: float) -> dict:
    """nnU-Net plans (2.1-era format) for a tiny 3-stage PlainConvUNet on an isotropic ``spacing`` grid."""
    n = len(FEATURES)
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [100, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH_SIZE),
                "median_image_size_in_voxels": [100, 128, 128],
                "spacing": [spacing] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "UNet_class_name": "PlainConvUNet",
                "UNet_base_num_features": FEATURES[0],
                "n_conv_per_stage_encoder": [1] * n,
                "n_conv_per_stage_decoder": [1] * (n - 1),
                "num_pool_per_axis": [n - 1] * 3,
                "pool_op_kernel_sizes": [list(s) for s in STRIDES],
                "conv_kernel_sizes": [[3, 3, 3]] * n,
                "unet_max_num_features": FEATURES[-1],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": 90.0, "median": 60.0, "min": -1024.0, "percentile_00_5": -1000.0,
                  "percentile_99_5": 1300.0, "std": 300.0}
        },
    }


def _dataset_json(labels: dict[int, str]) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: int(idx) for idx, name in sorted(labels.items())}},
        "numTraining": 1559,
        "file_ending": ".nii.gz",
    }


def _network(num_classes: int, seed: int, favour: Sequence[int]):
    """The tiny PlainConvUNet, randomly initialised from ``seed``; the output biases of the classes at
    indices ``favour`` are raised so that the random prediction holds them (TotalSegmentator returns an
    empty map without running the main model when the crop model finds none of the requested classes)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    n = len(FEATURES)
    net = PlainConvUNet(
        input_channels=1, n_stages=n, features_per_stage=list(FEATURES), conv_op=torch.nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * n, strides=[list(s) for s in STRIDES], n_conv_per_stage=[1] * n,
        num_classes=num_classes, n_conv_per_stage_decoder=[1] * (n - 1), conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
        dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True,
    )
    if favour:
        with torch.no_grad():
            for seg in net.decoder.seg_layers:
                seg.bias[list(favour)] += 4.0
    return net


def write_tiny_total_weights(
    root: str | Path,
    task_ids: Iterable[int] = (297, 298),
    favour: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Write tiny random ``total`` models for ``task_ids`` under ``root`` (a TotalSegmentator weights folder,
    i.e. what ``TOTALSEG_WEIGHTS_PATH`` / ``--weights-dir`` names) and return ``root``.

    ``favour``: ``total`` class names the random prediction should contain (their output biases are raised).
    """
    import torch

    root = Path(root)
    table = total_task_table()
    for tid in task_ids:
        if tid not in table:
            raise ValueError(f"task {tid} is not one of TotalSegmentator's 'total' models ({sorted(table)})")
        task = table[tid]
        dataset_name = Path(task["folder"]).name
        model_dir = root / task["folder"] / f"{task['trainer']}__{PLANS_NAME}__{CONFIGURATION}"
        (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
        plans = _plans(dataset_name, task["spacing"])
        dataset = _dataset_json(task["labels"])
        (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
        (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
        favoured = [idx for idx, name in task["labels"].items() if name in set(favour)]
        net = _network(len(task["labels"]) + 1, seed + tid, favoured)
        checkpoint = {  # the keys nnU-Net's trainer saves (nnUNetTrainer.save_checkpoint)
            "network_weights": net.state_dict(),
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {},
            "_best_ema": None,
            "current_epoch": 0,
            "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset,
                          "unpack_dataset": True, "device": torch.device("cpu")},
            "trainer_name": task["trainer"],
            "inference_allowed_mirroring_axes": None,  # the NoMirroring trainers: no test-time mirroring
        }
        torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    return root
