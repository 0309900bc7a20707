"""A headless MRML scene with the module logics SegVolGRU's bridge relies on, for use outside Slicer.

Inside the Slicer application none of this is needed: the application already owns the scene
(``slicer.mrmlScene``) and has registered every module logic, including the segmentation converter
rules. ``HeadlessSlicer`` reproduces the part of that start-up the bridge depends on, on the Qt-free
``slicer-core`` wheel, so that pytest and the headless demo run the same bridge code as Slicer does.
It does not set ``slicer.mrmlScene`` or ``slicer.modules``: the bridge never calls ``slicer.util``.
"""
from __future__ import annotations

import slicer


class HeadlessSlicer:
    """A fresh ``vtkMRMLScene`` with the application, colour, volumes, segmentations and markups logics.

    Attributes:
        scene: the ``vtkMRMLScene`` all nodes are added to.
        app_logic: the ``vtkSlicerApplicationLogic`` the module logics are registered with.
        color_logic: ``vtkMRMLColorLogic`` ("Colors"); default colour tables are in the scene.
        volumes_logic: ``vtkSlicerVolumesLogic`` ("Volumes").
        segmentations_logic: ``vtkSlicerSegmentationsModuleLogic`` ("Segmentations"). Giving it the scene
            registers the segmentation converter rules, without which ``AddEmptySegment`` fails
            ("Unable to construct empty representation type 'Binary labelmap'"); the constructor
            therefore registers it before anything else can add a segment.
        markups_logic: ``vtkSlicerMarkupsLogic`` ("Markups").
    """

    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        # The application logic's own colour logic fills the scene with the default colour tables
        # that display nodes (volumes, segmentations) look up by ID.
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()

        self.color_logic = self._register("Colors", slicer.vtkMRMLColorLogic())
        self.volumes_logic = self._register("Volumes", slicer.vtkSlicerVolumesLogic())
        self.segmentations_logic = self._register("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())
        self.markups_logic = self._register("Markups", slicer.vtkSlicerMarkupsLogic())

    def _register(self, name: str, logic):
        """Connect ``logic`` to the scene and the application logic under the module ``name``."""
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def close(self) -> None:
        """Remove every node from the scene, default colour tables included; for the end of a test or demo."""
        self.scene.Clear(True)
