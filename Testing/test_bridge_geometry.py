"""The bridge's coordinate rules on real MRML: clicks and ROIs to (K, J, I) voxel indices, and back.

Expected voxels are computed independently from the construction parameters (origin, spacing,
directions, parent transform matrices), never from the bridge's own matrices.
"""
from __future__ import annotations

import numpy as np
import pytest

from mrml_support import affine, require_slicer_core, rotation, vtk_matrix

slicer = require_slicer_core()

from vtkmodules.vtkCommonCore import vtkPoints  # noqa: E402
from vtkmodules.vtkCommonDataModel import vtkImageData  # noqa: E402
from vtkmodules.vtkCommonTransforms import vtkThinPlateSplineTransform  # noqa: E402

from segvolgru.errors import InputError  # noqa: E402
from segvolgru.slicer_bridge import (  # noqa: E402
    kji_to_world,
    load_volume,
    new_volume_node,
    points_to_voxels_kji,
    roi_to_box_kji,
    volume_array_kji,
    volume_spacing_kji,
    world_to_kji_matrix,
)

SHAPE_KJI = (7, 9, 11)


GEOMETRIES = {
    "anisotropic": dict(spacing=(2.0, 1.0, 3.0), origin=(10.0, -20.0, 5.0), directions=np.eye(3), parent=None),
    "flipped_lps": dict(
        spacing=(0.7, 0.7, 2.5), origin=(40.0, 35.0, -12.0), directions=np.diag([-1.0, -1.0, 1.0]), parent=None
    ),
    "oblique": dict(
        spacing=(1.5, 0.8, 2.2),
        origin=(-3.0, 7.0, 11.0),
        directions=rotation(2, 25) @ rotation(0, -40) @ np.diag([1.0, -1.0, 1.0]),
        parent=None,
    ),
    "oblique_under_transform": dict(
        spacing=(1.2, 2.0, 0.9),
        origin=(5.0, 0.0, -8.0),
        directions=rotation(1, 33) @ np.diag([-1.0, 1.0, 1.0]),
        parent=affine(rotation(0, 17) @ rotation(2, -50), (12.0, -4.0, 30.0)),
    ),
}


def linear_transform_node(scene, matrix: np.ndarray, name: str = "T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(vtk_matrix(matrix))
    return node


def make_volume(scene, spacing, origin, directions, parent, values=None):
    array = values if values is not None else np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI)
    volume = new_volume_node(scene, array, spacing, origin, directions, "CT")
    if parent is not None:
        volume.SetAndObserveTransformNodeID(linear_transform_node(scene, parent, "volume parent").GetID())
    return volume


def world_of_index(geometry, kji) -> np.ndarray:
    """World RAS of the continuous array index (k, j, i), straight from the construction parameters."""
    ijk = np.array(kji[::-1], dtype=float)
    local = np.asarray(geometry["origin"]) + geometry["directions"] @ (np.asarray(geometry["spacing"]) * ijk)
    parent = geometry["parent"] if geometry["parent"] is not None else np.eye(4)
    return (parent @ np.append(local, 1.0))[:3]


def add_points(scene, positions, labels=None):
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    for n, p in enumerate(positions):
        points.AddControlPoint(*[float(v) for v in p], labels[n] if labels else f"P-{n + 1}")
    return points


def thin_plate_transform_node(scene):
    source, target = vtkPoints(), vtkPoints()
    for p in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (50, 50, 50)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 2.0, p[1] + 0.03 * p[0] ** 1.5, p[2])
    spline = vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    node.SetAndObserveTransformToParent(spline)
    return node


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_click_at_world_position_of_voxel_comes_back_as_that_voxel(mrml, name):
    geometry = GEOMETRIES[name]
    volume = make_volume(mrml.scene, **geometry)
    voxels = [(0, 0, 0), (6, 8, 10), (3, 1, 7), (5, 8, 0), (0, 4, 10)]
    points = add_points(mrml.scene, [world_of_index(geometry, v) for v in voxels])
    assert points_to_voxels_kji(points, volume) == voxels


def test_click_under_its_own_linear_transform_uses_its_world_position(mrml):
    geometry = GEOMETRIES["oblique_under_transform"]
    volume = make_volume(mrml.scene, **geometry)
    points_parent = affine(rotation(1, 70), (-9.0, 3.0, 21.0))
    voxel = (4, 2, 9)
    local = (np.linalg.inv(points_parent) @ np.append(world_of_index(geometry, voxel), 1.0))[:3]
    points = add_points(mrml.scene, [local])
    points.SetAndObserveTransformNodeID(linear_transform_node(mrml.scene, points_parent, "points parent").GetID())
    assert points_to_voxels_kji(points, volume) == [voxel]


@pytest.mark.parametrize("directions", [np.eye(3), np.diag([-1.0, 1.0, -1.0])], ids=["aligned", "flipped"])
def test_click_rounds_half_voxel_up_towards_higher_index(mrml, directions):
    # Powers-of-two spacing keeps every coordinate exact, so the half-voxel positions are exactly halves.
    geometry = dict(spacing=(2.0, 0.5, 4.0), origin=(16.0, -8.0, 32.0), directions=directions, parent=None)
    volume = make_volume(mrml.scene, **geometry)
    offsets_and_expected = [
        ((0.5, 0.5, 0.5), (4, 5, 6)),
        ((-0.5, -0.5, -0.5), (3, 4, 5)),
        ((0.49, -0.49, 0.25), (3, 4, 5)),
        ((0.51, -0.51, 0.5), (4, 3, 6)),
    ]
    positions = [world_of_index(geometry, np.add((3, 4, 5), off)) for off, _ in offsets_and_expected]
    points = add_points(mrml.scene, positions)
    assert points_to_voxels_kji(points, volume) == [expected for _, expected in offsets_and_expected]


def test_kji_to_world_and_world_to_kji_are_inverse_and_match_the_construction(mrml):
    geometry = GEOMETRIES["oblique_under_transform"]
    volume = make_volume(mrml.scene, **geometry)
    for kji in [(0, 0, 0), (6, 8, 10), (2.5, 3.25, 7.0)]:
        world = np.array(kji_to_world(volume, kji))
        np.testing.assert_allclose(world, world_of_index(geometry, kji), atol=1e-9)
        np.testing.assert_allclose((world_to_kji_matrix(volume) @ np.append(world, 1.0))[:3], kji, atol=1e-9)


def test_point_outside_volume_is_rejected_with_its_index_and_label(mrml):
    geometry = GEOMETRIES["flipped_lps"]
    volume = make_volume(mrml.scene, **geometry)
    positions = [world_of_index(geometry, (1, 1, 1)), world_of_index(geometry, (2, 2, 2)),
                 world_of_index(geometry, (3, 9.2, 4))]
    points = add_points(mrml.scene, positions, ["a", "b", "tumour tip"])
    with pytest.raises(InputError, match=r"Point 2 \('tumour tip'\).*outside the volume"):
        points_to_voxels_kji(points, volume)


def test_axis_aligned_roi_covers_the_voxel_centres_inside_it_corners_included(mrml):
    geometry = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=np.eye(3), parent=None)
    volume = make_volume(mrml.scene, **geometry)
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(5.0, 4.0, 3.0)  # R, A, S = i, j, k here
    roi.SetSize(4.0, 2.0, 3.0)
    assert roi_to_box_kji(roi, volume) == (2, 3, 3, 4, 5, 7)  # k 1.5..4.5, j 3..5, i 3..7


def test_roi_partly_outside_is_clipped_to_the_volume(mrml):
    geometry = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=np.eye(3), parent=None)
    volume = make_volume(mrml.scene, **geometry)
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(-1.0, 5.0, 5.0)
    roi.SetSize(4.0, 2.0, 20.0)
    assert roi_to_box_kji(roi, volume) == (0, 4, 0, 6, 6, 1)


def test_roi_parent_transform_moves_the_box(mrml):
    geometry = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=np.eye(3), parent=None)
    volume = make_volume(mrml.scene, **geometry)
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(5.0, 4.0, 3.0)
    roi.SetSize(2.0, 2.0, 2.0)
    roi.SetAndObserveTransformNodeID(linear_transform_node(mrml.scene, affine(np.eye(3), (3.0, 0.0, -1.0))).GetID())
    assert roi_to_box_kji(roi, volume) == (1, 3, 7, 3, 5, 9)


@pytest.mark.parametrize("name", ["flipped_lps", "oblique", "oblique_under_transform"])
def test_rotated_transformed_roi_partly_outside_gives_the_8_corner_box(mrml, name):
    geometry = GEOMETRIES[name]
    volume = make_volume(mrml.scene, **geometry)
    roi_parent = affine(rotation(2, 12), (1.5, -2.0, 0.5))
    roi_rotation = rotation(0, 30) @ rotation(1, -20)
    size = np.array([9.0, 14.0, 6.0])
    # Centre the ROI on voxel (1, 2, 9), near the volume's corner, so part of it sticks out.
    centre_world = world_of_index(geometry, (1, 2, 9))
    centre_local = (np.linalg.inv(roi_parent) @ np.append(centre_world, 1.0))[:3]

    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "rotated box")
    roi.SetSize(*size)
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(affine(roi_rotation, centre_local)))
    roi.SetAndObserveTransformNodeID(linear_transform_node(mrml.scene, roi_parent, "roi parent").GetID())

    world_to_kji = np.linalg.inv(_index_to_world(geometry))
    corners = []
    for sx in (-0.5, 0.5):
        for sy in (-0.5, 0.5):
            for sz in (-0.5, 0.5):
                local = centre_local + roi_rotation @ (size * (sx, sy, sz))
                corners.append((world_to_kji @ roi_parent @ np.append(local, 1.0))[:3])
    corners = np.array(corners)
    low = np.maximum(np.ceil(corners.min(axis=0) - 1e-4), 0).astype(int)
    high = np.minimum(np.floor(corners.max(axis=0) + 1e-4), np.array(SHAPE_KJI) - 1).astype(int)
    assert np.any(corners.min(axis=0) < 0) or np.any(corners.max(axis=0) > np.array(SHAPE_KJI) - 1)
    assert roi_to_box_kji(roi, volume) == (*low.tolist(), *high.tolist())


def _index_to_world(geometry) -> np.ndarray:
    """4x4 from homogeneous (k, j, i) to world, from the construction parameters."""
    local = np.eye(4)
    local[:3, :3] = geometry["directions"] @ np.diag(geometry["spacing"])
    local[:3, 3] = geometry["origin"]
    parent = geometry["parent"] if geometry["parent"] is not None else np.eye(4)
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    return parent @ local @ kji_to_ijk


def test_roi_completely_outside_is_rejected_naming_the_axis_and_distance(mrml):
    geometry = dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), directions=np.eye(3), parent=None)
    volume = make_volume(mrml.scene, **geometry)
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far box")
    roi.SetCenter(5.0, 4.0, 20.0)
    roi.SetSize(2.0, 2.0, 2.0)
    with pytest.raises(InputError, match=r"far box.*axis K \(array axis 0\).*starts 13 voxel"):
        roi_to_box_kji(roi, volume)


def test_unplaced_roi_is_rejected(mrml):
    volume = make_volume(mrml.scene, **GEOMETRIES["anisotropic"])
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "empty")
    with pytest.raises(InputError, match="not been placed"):
        roi_to_box_kji(roi, volume)


@pytest.mark.parametrize("target", ["volume", "roi", "points"])
def test_non_linear_transform_is_rejected_with_advice_to_harden(mrml, target):
    volume = make_volume(mrml.scene, **GEOMETRIES["anisotropic"])
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(14.0, -16.0, 12.0)
    roi.SetSize(4.0, 4.0, 4.0)
    points = add_points(mrml.scene, [(14.0, -16.0, 12.0)])
    warp = thin_plate_transform_node(mrml.scene)
    {"volume": volume, "roi": roi, "points": points}[target].SetAndObserveTransformNodeID(warp.GetID())
    call = points_to_voxels_kji if target == "points" else roi_to_box_kji
    with pytest.raises(InputError, match="non-linear transform 'warp'.*Harden"):
        call(points if target == "points" else roi, volume)
    if target == "volume":
        with pytest.raises(InputError, match="Harden"):
            points_to_voxels_kji(points, volume)


def test_grid_transform_on_the_volume_is_rejected(mrml):
    volume = make_volume(mrml.scene, **GEOMETRIES["anisotropic"])
    volume.SetAndObserveTransformNodeID(mrml.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid").GetID())
    with pytest.raises(InputError, match="non-linear transform 'grid'"):
        points_to_voxels_kji(add_points(mrml.scene, [(14.0, -16.0, 12.0)]), volume)


def test_volume_array_is_a_read_only_kji_view_with_kji_spacing(mrml):
    values = np.random.default_rng(3).integers(-1000, 1000, SHAPE_KJI).astype(np.int16)
    volume = make_volume(mrml.scene, **GEOMETRIES["oblique"], values=values)
    array = volume_array_kji(volume)
    assert array.shape == SHAPE_KJI and array.dtype == np.int16
    np.testing.assert_array_equal(array, values)
    assert volume.GetImageData().GetScalarComponentAsDouble(10, 8, 6, 0) == values[6, 8, 10]
    assert not array.flags.writeable
    assert volume_spacing_kji(volume) == (2.2, 0.8, 1.5)


def test_vector_and_multi_component_volumes_are_refused(mrml):
    vector = mrml.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    rgb = vtkImageData()
    rgb.SetDimensions(4, 3, 2)
    rgb.AllocateScalars(3, 3)  # VTK_UNSIGNED_CHAR, three components
    vector.SetAndObserveImageData(rgb)
    with pytest.raises(InputError, match="vector"):
        volume_array_kji(vector)
    four_d = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dynamic")
    frames = vtkImageData()
    frames.SetDimensions(4, 3, 2)
    frames.AllocateScalars(10, 5)  # VTK_FLOAT, five frames per voxel
    four_d.SetAndObserveImageData(frames)
    with pytest.raises(InputError, match="5 values per voxel"):
        volume_spacing_kji(four_d)


def test_new_volume_rejects_non_orthonormal_directions(mrml):
    with pytest.raises(InputError, match="orthonormal"):
        new_volume_node(mrml.scene, np.zeros(SHAPE_KJI), (1, 1, 1), (0, 0, 0), np.diag([1.0, 2.0, 1.0]), "bad")


def test_loaded_volume_keeps_voxels_and_geometry(mrml, tmp_path):
    values = np.random.default_rng(5).integers(0, 3000, SHAPE_KJI).astype(np.int16)
    # Right-handed on purpose: Slicer's reader reverses K of left-handed (det < 0) volumes on load.
    geometry = dict(GEOMETRIES["oblique"], directions=rotation(2, 25) @ rotation(0, -40) @ np.diag([-1.0, -1.0, 1.0]))
    volume = make_volume(mrml.scene, **geometry, values=values)
    writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
    writer.SetFileName(str(tmp_path / "ct.nrrd"))
    assert writer.WriteData(volume)
    loaded = load_volume(mrml.scene, tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(volume_array_kji(loaded), values)
    np.testing.assert_allclose(kji_to_world(loaded, (6, 8, 10)), world_of_index(geometry, (6, 8, 10)), atol=1e-4)
    with pytest.raises(InputError, match="does not exist"):
        load_volume(mrml.scene, tmp_path / "missing.nrrd")
