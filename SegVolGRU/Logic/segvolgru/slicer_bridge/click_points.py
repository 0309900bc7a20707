"""Click points in markups lists: reading the placed ones as voxels, and showing a chosen set of clicks."""
from __future__ import annotations

import numpy as np
import slicer

from .geometry import node_to_world_matrix, points_to_voxels_kji
from .steps import ClickSource


def defined_points(points_node, volume_node) -> list[tuple[str, tuple[int, int, int], tuple[float, float, float], str]]:
    """(point ID, voxel (k, j, i), world RAS mm, label) of every placed control point, in list order.

    Points still being placed (preview) are left out: they follow the mouse. The voxel rule is
    ``points_to_voxels_kji``'s; with a preview point present it is applied to a scene-less copy of the placed
    points (same name and labels, so its messages still name the point).
    """
    node_to_world_matrix(points_node, "points")
    count = points_node.GetNumberOfControlPoints()
    placed = [i for i in range(count)
              if points_node.GetNthControlPointPositionStatus(i) == points_node.PositionDefined]
    positions = []
    for index in placed:
        position = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(index, position)
        positions.append(tuple(position))
    if len(placed) == count:
        voxels = points_to_voxels_kji(points_node, volume_node)
    else:
        copy = slicer.vtkMRMLMarkupsFiducialNode()
        copy.SetName(points_node.GetName())
        for index, position in zip(placed, positions):
            copy.AddControlPointWorld(list(position), points_node.GetNthControlPointLabel(index))
        voxels = points_to_voxels_kji(copy, volume_node)
    return [(points_node.GetNthControlPointID(index), voxel, position, points_node.GetNthControlPointLabel(index))
            for index, voxel, position in zip(placed, voxels, positions)]


def place_points(scene, shown: list[ClickSource | None], wanted: list[ClickSource | None]) -> None:
    """Make the point lists of ``scene`` show the clicks of ``wanted`` instead of ``shown``: remove the points of clicks
    that leave (remembering where they were), put back those that return, move those that moved."""
    wanted_keys = {(s.node_id, s.point_id) for s in wanted if s is not None}
    for source in shown:
        if source is None or (source.node_id, source.point_id) in wanted_keys:
            continue
        node = scene.GetNodeByID(source.node_id)
        point = -1 if node is None else node.GetControlPointIndexByID(source.point_id)
        if point >= 0:
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(point, position)
            source.position_world = tuple(position)
            node.RemoveNthControlPoint(point)
    for source in wanted:
        node = None if source is None else scene.GetNodeByID(source.node_id)
        if node is None:
            continue
        point = node.GetControlPointIndexByID(source.point_id)
        if point < 0:
            point = node.AddControlPointWorld(list(source.position_world), source.label)
            source.point_id = node.GetNthControlPointID(point)
            continue
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(point, position)
        if not np.allclose(position, source.position_world, atol=1e-6):
            node.SetNthControlPointPositionWorld(point, *source.position_world)


def color_points(points_node, rgb: tuple[float, float, float]) -> None:
    """Show a point list in one colour, selected or not (positive and negative clicks stay told apart)."""
    points_node.CreateDefaultDisplayNodes()
    display = points_node.GetDisplayNode()
    display.SetSelectedColor(*rgb)
    display.SetColor(*rgb)
