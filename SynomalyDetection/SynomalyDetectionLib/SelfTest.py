"""The module's in-Slicer self-test (Reload and Test, and ctest through slicer_add_python_unittest).

It drives the real widget and Slicer's event loop, so it runs inside Slicer only; the package's
``__init__`` does not import it (the rest of the Lib is tested without Slicer, with slicer-core).
The module file re-exports ``SynomalyDetectionTest``, where Slicer's test runner looks for it.
"""
import os

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from .Dependencies import missing_dependencies
from .Engine import engine_module
from .JobRunner import CANCELLED, FAILED, SUCCEEDED, process_gone
from .MrmlBridge import INPUT_ATTRIBUTE, latest_outputs, shown_in_layout
from .Parameters import MODULE_NAME


def _module():
    """The module file, imported by Slicer as a top-level module (it imports this one)."""
    import SynomalyDetection

    return SynomalyDetection


class SynomalyDetectionTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the panel, and detection on a generated phantom in a worker process, polled
    from the main thread without sleeping (the GIL stays with Slicer's main thread)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_widget_opens, self.test_widget_without_parent_keeps_its_setup,
                     self.test_panel_offers_what_it_can_use, self.test_detection_on_phantom):
            self.setUp()
            test()
        self.delayDisplay("Test passed")

    def test_widget_opens(self):
        widget = slicer.util.getModuleWidget(MODULE_NAME)
        self.assertIsNotNone(widget.ui.detectButton)
        self.assertGreater(widget.ui.modelComboBox.count, 0)

    def test_widget_without_parent_keeps_its_setup(self):
        widget = _module().SynomalyDetectionWidget()
        try:
            self.assertIsNotNone(widget.ui, "setup() ran from the base __init__; its results must stay")
            self.assertIsNotNone(widget.logic)
            self.assertIsNotNone(widget._timer)
            self.assertEqual(widget.logic.moduleName, MODULE_NAME)
        finally:
            # What the module manager does at unload: cleanup(), then drop the connection that the base
            # __init__ made; a connection left to a deleted widget raised at Slicer's exit.
            widget.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)",
                                                  widget._onModuleAboutToBeUnloaded)
            widget.parent.deleteLater()

    def test_panel_offers_what_it_can_use(self):
        """Colour images are inputs; label maps and detection outputs are not; the folder button does not
        show the working directory before a pick; Resume needs a checkpoint."""
        import numpy as np

        widget = slicer.util.getModuleWidget(MODULE_NAME)
        widget.initializeParameterNode()
        grey = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.float32), name="grey")
        for cls, name in (("vtkMRMLVectorVolumeNode", "colour"), ("vtkMRMLLabelMapVolumeNode", "labels"),
                          ("vtkMRMLScalarVolumeNode", "an output")):
            slicer.mrmlScene.AddNewNodeByClass(cls, name)
        slicer.util.getNode("an output").SetAttribute(INPUT_ATTRIBUTE, grey.GetID())
        widget.updateGUIFromParameterNode()
        selector = widget.ui.inputVolumeSelector
        offered = {selector.nodeFromIndex(i).GetName() for i in range(selector.nodeCount())}
        self.assertTrue({"grey", "colour"} <= offered, offered)
        self.assertFalse({"labels", "an output"} & offered, offered)

        parameters = widget.logic.parameters()
        parameters.training_from_folder, parameters.training_folder = True, ""
        widget.logic.save_parameters(parameters)
        self.assertNotIn(os.getcwd(), widget.ui.trainingFolderButton.text)
        parameters.training_folder, parameters.model_name = slicer.app.temporaryPath, "synomaly-self-test-none"
        widget.logic.save_parameters(parameters)
        self.assertTrue(widget.ui.startTrainingButton.enabled)
        self.assertFalse(widget.ui.resumeTrainingButton.enabled, "no checkpoint of that name")

    def _phantom(self, name="phantom"):
        phantom = engine_module("evaluation.phantom").make_phantom(seed=engine_module("commands.demo").DEMO_SEED)
        return phantom, slicer.util.addVolumeFromArray(phantom.volume, phantom.geometry.ijk_to_ras(), name=name)

    def test_detection_on_phantom(self):
        import numpy as np

        if missing_dependencies().any:
            self.delayDisplay(f"Skipped: missing {missing_dependencies().describe()}; "
                              "open the module and click Detect to install them.")
            return
        model_file = engine_module("files.model_file")
        if model_file.DEMO_MODEL not in [m.name for m in model_file.list_models()]:
            self.delayDisplay(f"Skipped: the bundled model '{model_file.DEMO_MODEL}' is missing.")
            return
        phantom, volume = self._phantom()
        before = slicer.util.arrayFromVolume(volume).copy()
        logic = _module().SynomalyDetectionLogic()

        self.delayDisplay("Detecting from the console API (a worker process, waited for)")
        outputs = logic.detect(volume, model=model_file.DEMO_MODEL, device="cpu")
        segmentId = outputs.segmentation.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
        segment = slicer.util.arrayFromSegmentBinaryLabelmap(outputs.segmentation, segmentId, volume) > 0
        lesion = phantom.lesion_mask > 0
        self.assertTrue(segment.any())
        self.assertGreater((segment & lesion).sum(), 0.5 * lesion.sum())
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        parent = sh.GetItemParent(sh.GetItemByDataNode(volume))
        for node in outputs.nodes():
            self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), parent)

        self.delayDisplay("Detecting in the background, polling without sleeping")
        parameters = logic.parameters()
        parameters.input_volume, parameters.model, parameters.device = volume, model_file.DEMO_MODEL, "cpu"
        parameters.ensemble = 2
        logic.save_parameters(parameters)
        job = logic.start_detection(logic.parameters())
        while job.poll():
            slicer.app.processEvents()
        self.assertEqual(job.state, SUCCEEDED)
        self.assertIsNotNone(job.result.uncertainty, "an ensemble's uncertainty map is a node")

        self.delayDisplay("Cancelling a run: its process is gone before the next one starts")
        count = slicer.mrmlScene.GetNumberOfNodes()
        parameters = logic.parameters()
        parameters.update_outputs, parameters.ensemble = False, 0
        job = logic.start_detection(parameters)
        pid = job.pid
        job.cancel()
        if os.name == "posix":
            self.assertTrue(process_gone(pid))
        while job.poll():
            slicer.app.processEvents()
        self.assertEqual(job.state, CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

        self.delayDisplay("The panel: results over the analysed volume, side by side with the counterfactual")
        widget = slicer.util.getModuleWidget(MODULE_NAME)
        widget.initializeParameterNode()
        other = self._phantom("selected later")[1]
        parameters = widget.logic.parameters()
        parameters.input_volume, parameters.model, parameters.device = volume, model_file.DEMO_MODEL, "cpu"
        parameters.update_outputs = False
        widget.logic.save_parameters(parameters)
        widget.onDetect()
        self.assertIsNotNone(widget._job)
        widget.ui.inputVolumeSelector.setCurrentNode(other)
        while widget._job is not None:
            slicer.app.processEvents()
        layoutManager = slicer.app.layoutManager()
        self.assertTrue(shown_in_layout(slicer.mrmlScene, ("Red", "Yellow")))
        red = layoutManager.sliceWidget("Red").mrmlSliceCompositeNode()
        yellow = layoutManager.sliceWidget("Yellow").mrmlSliceCompositeNode()
        self.assertEqual(red.GetBackgroundVolumeID(), volume.GetID())
        counterfactual = slicer.mrmlScene.GetNodeByID(yellow.GetBackgroundVolumeID())
        self.assertTrue(counterfactual.GetName().startswith(f"{volume.GetName()} counterfactual"))
        self.assertTrue(red.GetLinkedControl() and yellow.GetLinkedControl())

        self.delayDisplay("An error while polling fails the job: timer stopped, process gone, buttons idle")
        job = widget.logic.start_detection(widget.logic.parameters(), lambda *args: 1 / 0)
        widget._job, widget._jobKind = job, "detection"
        widget._timer.start()
        while widget._job is not None:
            slicer.app.processEvents()
        self.assertFalse(widget._timer.active)
        self.assertEqual(job.state, FAILED)
        self.assertTrue(widget.ui.detectButton.enabled)
        if os.name == "posix":
            self.assertTrue(process_gone(job.pid))

        self.delayDisplay("The panel: two checked volumes, one after the other")
        widget.ui.severalInputsCheckBox.checked = True
        for node in (volume, other):
            widget.ui.inputVolumesSelector.setCheckState(node, qt.Qt.Checked)
        self.assertEqual({n.GetName() for n in widget.logic.parameters().input_volumes},
                         {volume.GetName(), other.GetName()})
        self.assertFalse(widget.ui.inputVolumeSelector.enabled)
        widget.onDetect()
        while widget._job is not None:
            slicer.app.processEvents()
        self.assertIn("2 volumes done", widget.ui.detectionStatusLabel.text)
        self.assertIsNotNone(latest_outputs(other), "the second volume has its outputs too")
        widget.ui.severalInputsCheckBox.checked = False
        self.assertTrue(widget.ui.inputVolumeSelector.enabled)
