"""MRML bridge: Slicer nodes in, voxel prompts and arrays out; masks back into segments.

Only this layer knows MRML. It never touches Qt or ``slicer.app``: every scene, node and logic is
passed in explicitly, so the same code runs inside Slicer and on the ``slicer-core`` wheel.
"""
from __future__ import annotations

from .click_points import color_points
from .geometry import (
    ijk_to_world_matrix,
    kji_to_world,
    kji_to_world_matrix,
    node_to_world_matrix,
    points_to_voxels_kji,
    roi_to_box_kji,
    volume_shape_kji,
    world_to_kji_matrix,
)
from .scene import HeadlessSlicer
from .segment_writer import (
    copy_masking,
    create_segment_editor,
    ensure_segment,
    load_seg_nrrd,
    read_segment_mask,
    restore_segment_voxels,
    save_seg_nrrd,
    write_segment_mask,
)
from .step_queue import StepQueue
from .volumes import load_volume, new_volume_node, volume_array_kji, volume_spacing_kji
from .steps import PredictionError, Step, StepStatus
from .workflow import SegmentationWorkflow

__all__ = [
    "HeadlessSlicer",
    "PredictionError",
    "SegmentationWorkflow",
    "Step",
    "StepQueue",
    "StepStatus",
    "color_points",
    "copy_masking",
    "create_segment_editor",
    "ensure_segment",
    "ijk_to_world_matrix",
    "kji_to_world",
    "kji_to_world_matrix",
    "load_seg_nrrd",
    "load_volume",
    "new_volume_node",
    "node_to_world_matrix",
    "points_to_voxels_kji",
    "read_segment_mask",
    "roi_to_box_kji",
    "restore_segment_voxels",
    "save_seg_nrrd",
    "volume_array_kji",
    "volume_shape_kji",
    "volume_spacing_kji",
    "world_to_kji_matrix",
    "write_segment_mask",
]
