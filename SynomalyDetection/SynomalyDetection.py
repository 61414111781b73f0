"""Synomaly Detection: unsupervised anomaly detection (Synomaly noise + multi-stage diffusion) in 3D Slicer.

Thin on purpose: the work is in SynomalyDetectionLib (Qt-free, tested with slicer-core) and in the
engine package ``synomaly``, which runs in a worker process. Importing this file imports neither torch
nor the engine.
"""
import logging
import sys
import traceback

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4 has no translations
    def _(text):
        return text

    def translate(context, text):
        return text

from SynomalyDetectionLib import (MODULE_NAME, Parameters, SynomalyLogic, WorkerError, ensure_dependencies,
                                  format_report, get_parameter_node, missing_dependencies)
from SynomalyDetectionLib.Batch import finished_outputs
from SynomalyDetectionLib.Dependencies import dependency_report, installing
from SynomalyDetectionLib.Engine import is_user_error
from SynomalyDetectionLib.JobRunner import (CANCELLED, SUCCEEDED, remove_stale_job_folders, waiting_jobs,
                                            worker_python)
from SynomalyDetectionLib.MrmlBridge import default_input_volume, output_node_ids, show_results
from SynomalyDetectionLib.Panel import (DeviceProbe, RunLog, device_choices, memory_hint, select_data,
                                        set_checked_nodes)
from SynomalyDetectionLib.SelfTest import SynomalyDetectionTest  # noqa: F401 (Slicer's test runner looks here)
from SynomalyDetectionLib.SlicerInstall import install_torch, pip_install_logged

DOCUMENTATION_URL = "https://github.com/synomaly/SlicerSynomalyDetection#readme"
CITATION = ("Bi, Huang, Clarenbach, Ghotbi, Karlas, Navab, Jiang. "
            "Synomaly Noise and Multi-Stage Diffusion: A Novel Approach for Unsupervised Anomaly Detection "
            "in Medical Images. Medical Image Analysis, 2025. arXiv:2411.04004.")


class SynomalyDetection(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Synomaly Detection")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SynomalyDetection developers (Synomaly project)"]
        self.parent.helpText = _("""
<p>Finds what does not look healthy in a 3D image, with a diffusion model trained on healthy images only (Synomaly
noise and multi-stage diffusion). No lesion annotations are needed.</p>
<p><b>Detect anomalies:</b> pick the input volume, optionally a mask (segmentation or label map, e.g. the brain) and
a model, then click <i>Detect anomalies</i>. <i>Several volumes</i>: check them instead; they run one after the
other with the same mask, model and settings. A liver CT model needs a liver mask: a segmentation with a "liver"
segment (e.g. from the TotalSegmentator extension) or a liver label map; until one is chosen, the button's tooltip
says so. The run goes on in a separate process, so Slicer stays responsive; <i>Cancel</i> stops it and adds nothing.
Results are placed beside the input in the Data module: a segmentation "&lt;input&gt; anomalies" (segment "Anomaly"),
a scalar volume "&lt;input&gt; counterfactual" (the healthy-looking version of the input), "&lt;input&gt; anomaly
map" (coloured over the input where scores are high) and, for an ensemble, "&lt;input&gt; uncertainty". The views
then show the input and the counterfactual side by side, linked. The panel shows the anomalous volume in mL and its
connected components. <i>Advanced</i>: device, number of stages, noise level, threshold (default: the model's
calibrated threshold) and ensemble size.</p>
<p><b>2D images</b> (PNG, JPEG, a single-frame DICOM; e.g. carotid ultrasound) load as volumes of one slice and work
like volumes with a 2D model (preset carotid-us): colour is taken as grey, and the mask is the vessel's lumen
(required: the model looks at a disc around it). The panel then shows areas. Models of the 3D presets refuse 2D
images.</p>
<p><b>Retrain:</b> choose healthy cases (a folder of image files, or loaded volumes), a preset, the number of steps,
the device and a name; <i>Start training</i> shows the loss as a plot, <i>Cancel</i> keeps a checkpoint that
<i>Resume</i> continues. The new model joins the model list. Presets that need a mask (liver-ct, carotid-us) take
each loaded volume's from the segmentation made on it (a 'liver' or 'lumen' segment, or a single one).</p>
<p><b>Python console:</b><br>
<code>logic = slicer.util.getModuleLogic("{module}")</code><br>
<code>outputs = logic.detect(getNode("FLAIR"), threshold=None, device="auto")</code> (returns the segmentation,
counterfactual and anomaly-map nodes and the report)<br>
<code>logic.train("/data/healthy", name="site-a", preset="brain-flair", steps=2000)</code></p>
<p>Research software: not for clinical use. Documentation: <a href="{docs}">{docs}</a></p>
""").format(module=MODULE_NAME, docs=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("""
<p>The method is from: {citation}</p>
<p>This module is a product implementation for whole 3D volumes; it is not the authors' reference code.</p>
""").format(citation=CITATION)


class SynomalyDetectionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # Set before the base class runs: without a parent it calls setup() from its __init__.
        self.logic = self.ui = self._parameterNode = self._job = self._jobKind = None
        self._runLog = self._timer = self._deviceProbe = self._devices = None
        self._updatingGUI = self._installingDependencies = False
        ScriptedLoadableModuleWidget.__init__(self, parent)  # also runs VTKObservationMixin.__init__

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SynomalyDetection.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SynomalyDetectionLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJob)

        remove_stale_job_folders()  # patient images a crashed Slicer left in its temporary folder
        self._populateDevices()
        self._populatePresets()
        self._populateModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for selector in (self.ui.inputVolumeSelector, self.ui.maskSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        for selector in (self.ui.inputVolumesSelector, self.ui.trainingVolumesSelector):
            selector.connect("checkedNodesChanged()", self.updateParameterNodeFromGUI)
        for combo in (self.ui.modelComboBox, self.ui.deviceComboBox, self.ui.presetComboBox,
                      self.ui.trainingDeviceComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        for spinBox in (self.ui.stagesSpinBox, self.ui.noiseLevelSpinBox, self.ui.ensembleSpinBox,
                        self.ui.stepsSpinBox):
            spinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.thresholdSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        for toggle in (self.ui.severalInputsCheckBox, self.ui.updateOutputsCheckBox,
                       self.ui.trainFromFolderRadioButton, self.ui.trainFromVolumesRadioButton):
            toggle.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        # Emitted on every pick, the same folder again included (directoryChanged is not).
        self.ui.trainingFolderButton.connect("directorySelected(QString)", self.updateParameterNodeFromGUI)
        self.ui.modelNameLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)

        self.ui.refreshModelsButton.connect("clicked()", self._populateModels)
        self.ui.verifyModelButton.connect("clicked()", self.onVerifyModel)
        self.ui.deleteModelButton.connect("clicked()", self.onDeleteModel)
        self.ui.detectButton.connect("clicked()", self.onDetect)
        self.ui.cancelDetectionButton.connect("clicked()", self.onCancel)
        self.ui.startTrainingButton.connect("clicked()", lambda: self.onTrain(resume=False))
        self.ui.resumeTrainingButton.connect("clicked()", lambda: self.onTrain(resume=True))
        self.ui.cancelTrainingButton.connect("clicked()", self.onCancel)
        self.ui.upgradeDependenciesButton.connect("clicked()", lambda: self.ensureDependencies(everything=True))
        self.ui.dependenciesCollapsibleButton.connect("contentsCollapsed(bool)", self._showDependencies)

        self.initializeParameterNode()

    def cleanup(self):
        """Module unload and Slicer exit: nothing waits here; a training run saves its checkpoint and
        stops by itself."""
        if self._timer is not None:
            self._timer.stop()
        self._stopJob(release=True)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        """A detection is stopped (its nodes go with the scene); a training run goes on, its loss plot
        moving into the new scene."""
        if self._jobKind == "detection":
            self._stopJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        """Reload the Lib package too, so that edits to it take effect."""
        self._stopJob(release=True)
        for name in [n for n in sys.modules if n.split(".")[0] == "SynomalyDetectionLib"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # parameter node <-> GUI

    def initializeParameterNode(self):
        node = get_parameter_node()
        parameters = Parameters.from_node(node)
        if parameters.input_volume is None:
            parameters.input_volume = default_input_volume(slicer.mrmlScene)
            parameters.to_node(node)
        self.setParameterNode(node)

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        parameters = Parameters.from_node(self._parameterNode)
        self._updatingGUI = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(parameters.input_volume)
            self.ui.severalInputsCheckBox.checked = parameters.several_inputs
            set_checked_nodes(self.ui.inputVolumesSelector, parameters.input_volumes, qt.Qt.Checked, qt.Qt.Unchecked)
            self.ui.maskSelector.setCurrentNode(parameters.mask)
            self._hideOutputs()
            self._selectModel(parameters.model)
            select_data(self.ui.deviceComboBox, parameters.device)
            self.ui.stagesSpinBox.value = parameters.stages
            self.ui.noiseLevelSpinBox.value = parameters.noise_level
            self.ui.thresholdSpinBox.value = parameters.threshold
            self.ui.ensembleSpinBox.value = parameters.ensemble
            self.ui.updateOutputsCheckBox.checked = parameters.update_outputs
            self.ui.reportLabel.text = format_report(parameters.report())
            sourceButton = (self.ui.trainFromFolderRadioButton if parameters.training_from_folder
                            else self.ui.trainFromVolumesRadioButton)
            sourceButton.checked = True
            if parameters.training_folder and self.ui.trainingFolderButton.directory != parameters.training_folder:
                self.ui.trainingFolderButton.directory = parameters.training_folder
            # Before a folder is chosen the button would show Slicer's working directory.
            self.ui.trainingFolderButton.text = parameters.chosen_folder or _("Choose a folder...")
            set_checked_nodes(self.ui.trainingVolumesSelector, parameters.training_volumes, qt.Qt.Checked,
                              qt.Qt.Unchecked)
            select_data(self.ui.presetComboBox, parameters.preset)
            self.ui.stepsSpinBox.value = parameters.steps
            select_data(self.ui.trainingDeviceComboBox, parameters.training_device)
            self.ui.deviceHintLabel.text = memory_hint(parameters.device, self._devices)
            if self.ui.modelNameLineEdit.text != parameters.model_name:
                self.ui.modelNameLineEdit.text = parameters.model_name
        finally:
            self._updatingGUI = False
        self._updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        parameters = Parameters.from_node(self._parameterNode)
        parameters.input_volume = self.ui.inputVolumeSelector.currentNode()
        parameters.several_inputs = self.ui.severalInputsCheckBox.checked
        parameters.input_volumes = list(self.ui.inputVolumesSelector.checkedNodes())
        parameters.mask = self.ui.maskSelector.currentNode()
        parameters.model = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""
        parameters.device = self.ui.deviceComboBox.currentData or "auto"
        parameters.stages = self.ui.stagesSpinBox.value
        parameters.noise_level = self.ui.noiseLevelSpinBox.value
        parameters.threshold = self.ui.thresholdSpinBox.value
        parameters.ensemble = self.ui.ensembleSpinBox.value
        parameters.update_outputs = self.ui.updateOutputsCheckBox.checked
        parameters.training_from_folder = self.ui.trainFromFolderRadioButton.checked
        picked = Parameters(training_folder=self.ui.trainingFolderButton.directory).chosen_folder
        parameters.training_folder = picked or parameters.training_folder
        parameters.training_volumes = list(self.ui.trainingVolumesSelector.checkedNodes())
        parameters.preset = self.ui.presetComboBox.currentText or parameters.preset
        parameters.steps = self.ui.stepsSpinBox.value
        parameters.training_device = self.ui.trainingDeviceComboBox.currentData or "auto"
        parameters.model_name = self.ui.modelNameLineEdit.text.strip()
        parameters.to_node(self._parameterNode)

    def _hideOutputs(self):
        """Detection outputs are no inputs, masks or healthy cases: the selectors do not offer them."""
        hidden = output_node_ids(slicer.mrmlScene)
        for selector in (self.ui.inputVolumeSelector, self.ui.inputVolumesSelector, self.ui.maskSelector,
                         self.ui.trainingVolumesSelector):
            selector.sortFilterProxyModel().hiddenNodeIDs = hidden

    def _populateDevices(self):
        """auto and cpu at once; each CUDA GPU once a probe process has listed them (torch is not imported
        in Slicer's process)."""
        wasUpdating, self._updatingGUI = self._updatingGUI, True
        try:
            for combo in (self.ui.deviceComboBox, self.ui.trainingDeviceComboBox):
                combo.clear()
                for value, label in device_choices(self._devices):
                    combo.addItem(label, value)
        finally:
            self._updatingGUI = wasUpdating
        if self._devices is None and self._deviceProbe is None and not missing_dependencies().torch:
            try:  # Slicer's launcher: output piped, no console window on Windows
                self._deviceProbe = DeviceProbe(worker_python(), launch=slicer.util.launchConsoleProcess)
                self._timer.start()
            except (OSError, WorkerError) as exc:
                logging.warning(f"Synomaly: the compute devices could not be listed: {exc}")
        if self._parameterNode is not None:
            self.updateGUIFromParameterNode()

    def _selectModel(self, identifier):
        index = self.ui.modelComboBox.findData(identifier) if identifier else -1
        if index < 0 and not identifier:
            index = self.ui.modelComboBox.findData(self.logic.default_model_name())
        self.ui.modelComboBox.setCurrentIndex(max(index, 0))

    def _populatePresets(self):
        self.ui.presetComboBox.clear()
        for preset in self.logic.preset_names():
            self.ui.presetComboBox.addItem(preset, preset)

    def _populateModels(self):
        """Bundled and user-trained models; reading model files needs the dependencies, so without them
        the list holds only the default model until they are installed."""
        combo = self.ui.modelComboBox
        wasUpdating, self._updatingGUI = self._updatingGUI, True
        try:
            combo.clear()
            entries = self.logic.model_choices()
            for entry in entries:
                combo.addItem(entry.label, entry.identifier)
                combo.setItemData(combo.count - 1, entry.description, qt.Qt.ToolTipRole)
            if not entries:
                combo.addItem(_("Default model"), "")
        finally:
            self._updatingGUI = wasUpdating
        if self._parameterNode is not None:
            self._selectModel(Parameters.from_node(self._parameterNode).model)

    def _updateButtons(self):
        # A console detect() or train() waits processing events: no second run meanwhile.
        idle = (self._job is None and not waiting_jobs() and not self._installingDependencies
                and not installing())
        parameters = Parameters.from_node(self._parameterNode) if self._parameterNode is not None else None
        # Why Detect cannot run (no input; a liver model without a mask), said on the button itself.
        blocker = self.logic.detection_blocker(parameters) if parameters is not None else _("Choose an input volume.")
        self.ui.detectButton.enabled = idle and not blocker
        self.ui.detectButton.toolTip = blocker or _("Run the detection in the background.")
        self.ui.cancelDetectionButton.enabled = self._job is not None and self._jobKind == "detection"
        self.ui.inputVolumeSelector.enabled = parameters is not None and not parameters.several_inputs
        self.ui.inputVolumesSelector.enabled = parameters is not None and parameters.several_inputs
        self.ui.deleteModelButton.enabled = idle and self.logic.is_user_model(parameters and parameters.model)
        trainingButtons = ((self.ui.startTrainingButton, False, _("Train a new model on the chosen healthy cases.")),
                           (self.ui.resumeTrainingButton, True, _("Continue the cancelled run of this name.")))
        for button, resume, tip in trainingButtons:  # Resume only where a checkpoint of that name is kept
            blocker = self.logic.training_blocker(parameters, resume) if parameters is not None else "-"
            button.enabled = idle and not blocker
            button.toolTip = blocker if parameters is not None and blocker else tip
        self.ui.cancelTrainingButton.enabled = self._job is not None and self._jobKind == "training"
        self.ui.trainingFolderButton.enabled = parameters is not None and parameters.training_from_folder
        self.ui.trainingVolumesSelector.enabled = parameters is not None and not parameters.training_from_folder

    def onVerifyModel(self):
        """The model file against its id (a changed or damaged file does not match)."""
        title = _("Model check")
        try:
            with slicer.util.WaitCursor():
                problem = self.logic.verify_model(self.ui.modelComboBox.currentData or None)
        except Exception as exc:
            return self._showError(title, exc)
        if problem:
            return slicer.util.warningDisplay(problem, windowTitle=title)
        slicer.util.infoDisplay(_("The model file matches its id."), windowTitle=title)

    def onDeleteModel(self):
        name = self.ui.modelComboBox.currentText
        if not slicer.util.confirmOkCancelDisplay(_("Delete the model '{name}' and its training checkpoint?").format(
                name=name), windowTitle=_("Delete model")):
            return
        try:
            self.logic.delete_model(self.ui.modelComboBox.currentData)
        except Exception as exc:
            return self._showError(_("Delete model"), exc)
        self._populateModels()
        self.updateParameterNodeFromGUI()

    # dependencies

    def ensureDependencies(self, everything=False) -> bool:
        """On first use: offer to install what the engine needs (or is too old); False (after saying why)
        when it is missing. ``everything``: the panel's Upgrade/reinstall. The run buttons stay disabled
        while installing: the installation processes events."""
        if self._installingDependencies or installing() or (everything and (self._job or waiting_jobs())):
            return False
        wasMissing = missing_dependencies().any
        self._installingDependencies = True
        self._updateButtons()
        try:
            problem = ensure_dependencies(
                confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Synomaly Detection")),
                install_torch=install_torch,
                pip_install=self._pipInstall, everything=everything)
        finally:
            self._installingDependencies = False
            self._updateButtons()
            self._showDependencies()
        if problem:
            extra = {"detailedText": problem.details} if problem.details else {}
            slicer.util.warningDisplay(problem.message, windowTitle=_("Synomaly Detection"), **extra)
            return False
        if wasMissing or everything:
            self._populateModels()
            self._devices = self._deviceProbe = None
            self._populateDevices()
        return True

    def _showDependencies(self, collapsed=False):
        """The engine's packages with the versions installed (read from metadata, nothing imported)."""
        if not collapsed:
            self.ui.dependenciesLabel.text = "\n".join(p.describe() for p in dependency_report())

    def _pipInstall(self, requirements):
        """pip's lines go to the run log as they come."""
        self._newRunLog(_("Installing Python packages"))
        self.ui.runLogCollapsibleButton.collapsed = False
        pip_install_logged(requirements, lambda line: self._logProgress(None, line))

    # running jobs

    def _showError(self, title, exc):
        if is_user_error(exc):
            slicer.util.errorDisplay(str(exc), windowTitle=title)
            return
        details = getattr(exc, "details", "") if isinstance(exc, WorkerError) else ""
        details = details or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        logging.error(details)
        slicer.util.errorDisplay(_("{title}: {error}").format(title=title, error=exc), windowTitle=title,
                                 detailedText=details)

    def _startJob(self, kind, start):
        try:
            with slicer.util.WaitCursor():  # the inputs are copied out and written to the job folder
                job = start()
        except Exception as exc:
            self._showError(_("Synomaly Detection could not start"), exc)
            return
        self._job, self._jobKind = job, kind
        self._timer.start()
        self._updateButtons()

    def _newRunLog(self, title):
        self._runLog = RunLog()
        self._runLog.add(0.0, title)
        self.ui.runLogTextEdit.setPlainText(self._runLog.text())
        self.ui.runTimeLabel.text = ""

    def _logProgress(self, fraction, message):
        line = self._runLog.add(fraction, message)
        if line:
            self.ui.runLogTextEdit.appendPlainText(line)

    def _stopJob(self, release=False):
        """Forget the running job: a stopped job writes no nodes. A detection is killed at once;
        ``release`` (unload, exit): a training run is asked to stop and saves its checkpoint by itself,
        nothing waits for it."""
        job, self._job = self._job, None
        if job is not None:
            job.release() if release else job.stop()
        if self.ui is not None:
            self._updateButtons()

    def _pollDevices(self):
        probe = self._deviceProbe
        if probe is None or probe.poll():
            return
        self._deviceProbe = None
        if probe.found is not None:  # else the probe has logged why
            self._devices = probe.found
            self._populateDevices()

    def _pollJob(self):
        self._pollDevices()
        job = self._job
        if job is None:
            if self._deviceProbe is None:
                self._timer.stop()
            return
        if job.exited:  # reading the results and writing nodes takes a moment
            with slicer.util.WaitCursor():
                running = job.poll()
        else:
            running = job.poll()
        if self._runLog is not None:
            self.ui.runTimeLabel.text = self._runLog.times()
        if running:
            return
        kind, self._job = self._jobKind, None
        self._updateButtons()
        elapsed = self._runLog.clock() - self._runLog.started if self._runLog is not None else 0.0
        if kind == "detection":
            self._onDetectionFinished(job, elapsed)
        else:
            self._onTrainingFinished(job, elapsed)

    def _cancelling(self) -> bool:
        """A cancelled training run goes on until it has saved its checkpoint: its status stays "Cancelling..."."""
        return self._job is not None and self._job.cancelling

    def onCancel(self):
        if self._job is not None:
            label = self.ui.detectionStatusLabel if self._jobKind == "detection" else self.ui.trainingStatusLabel
            label.text = _("Cancelling...")
            self._job.cancel()

    # detection

    def _busy(self, label) -> bool:
        """A run goes on, here or from the Python console (whose wait processes events): say so."""
        if self._job is None and not waiting_jobs():
            return False
        label.text = _("Another run is in progress; wait for it to end or cancel it.")
        return True

    def onDetect(self):
        if self._busy(self.ui.detectionStatusLabel) or not self.ensureDependencies():
            return
        self.updateParameterNodeFromGUI()
        self._newRunLog(_("Detection"))
        self.ui.detectionProgressBar.value = 0
        self.ui.detectionStatusLabel.text = _("Starting...")
        self._startJob("detection", lambda: self.logic.start_detection(
            Parameters.from_node(self._parameterNode), self._onDetectionProgress))

    def _onDetectionProgress(self, fraction, message):
        self._logProgress(fraction, message)
        self.ui.detectionProgressBar.value = int(round(100 * fraction))
        if not self._cancelling():
            self.ui.detectionStatusLabel.text = message

    def _onDetectionFinished(self, job, elapsed):
        """A batch's outputs done before a cancel or a failure stay: the last one is shown."""
        results = finished_outputs(job)
        if job.state == SUCCEEDED:
            self.ui.detectionProgressBar.value = 100
            done = _("{count} volumes done in {seconds:.0f} s.") if len(results) > 1 else _("Done in {seconds:.0f} s.")
            self.ui.detectionStatusLabel.text = done.format(count=len(results), seconds=elapsed)
        elif job.state == CANCELLED:
            self.ui.detectionProgressBar.value = 0
            kept = _("Cancelled; the outputs of the {count} volume(s) done before stay.") if results else _(
                "Cancelled; nothing was added to the scene.")
            self.ui.detectionStatusLabel.text = kept.format(count=len(results))
        else:
            name = getattr(job, "stopped_at", "")  # a batch names the volume that failed
            self.ui.detectionStatusLabel.text = _("Failed on '{name}'.").format(name=name) if name else _("Failed.")
            self._showError(_("Anomaly detection failed"), job.error)
        if results:
            self.ui.reportLabel.text = format_report(results[-1].report)
            self._hideOutputs()
            show_results(results[-1], slicer.app.layoutManager())

    # training

    def onTrain(self, resume=False):
        if self._busy(self.ui.trainingStatusLabel) or not self.ensureDependencies():
            return
        self.updateParameterNodeFromGUI()
        self._newRunLog(_("Training (resumed)") if resume else _("Training"))
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingStatusLabel.text = _("Resuming...") if resume else _("Starting...")

        def start():
            job = self.logic.start_training(Parameters.from_node(self._parameterNode), resume,
                                            self._onTrainingProgress)
            try:
                slicer.modules.plots.logic().ShowChartInLayout(self.logic.loss_curve.chart)
            except Exception as exc:
                logging.warning(f"The loss plot could not be shown: {exc}")
            return job

        self._startJob("training", start)

    def _onTrainingProgress(self, step, total, loss, message):
        self._logProgress(float(step) / max(float(total), 1.0), message)
        self.ui.trainingProgressBar.maximum = max(int(total), 1)
        self.ui.trainingProgressBar.value = int(step)
        if not self._cancelling():
            self.ui.trainingStatusLabel.text = message

    def _onTrainingFinished(self, job, elapsed):
        if job.state == SUCCEEDED:
            entry = job.result
            self.ui.trainingStatusLabel.text = _("Model '{name}' trained in {minutes:.1f} min.").format(
                name=entry.name, minutes=elapsed / 60)
            self._populateModels()
            self._selectModel(entry.identifier)
            self.updateParameterNodeFromGUI()
        elif job.state == CANCELLED:
            self.ui.trainingStatusLabel.text = _("Cancelled; a checkpoint was kept: click Resume to continue.")
        else:
            self.ui.trainingStatusLabel.text = _("Failed.")
            self._showError(_("Training failed"), job.error)


class SynomalyDetectionLogic(SynomalyLogic, ScriptedLoadableModuleLogic):
    """The Python-console API (see SynomalyDetectionLib.Logic.SynomalyLogic):

    ``SynomalyDetectionLogic().detect(volumeNode, maskNode=None, model=None, **settings)`` returns the
    output nodes; ``SynomalyDetectionLogic().train(healthy, name, preset=..., steps=...)`` trains a model.
    Both run the engine in a worker process and wait for it; ``start_detection``/``start_training``
    return the running job instead. SynomalyLogic comes first in the bases: its __init__ runs once and
    hands on to ScriptedLoadableModuleLogic's through super().
    """

    def __init__(self, engine=None, user_models_dir=None):
        SynomalyLogic.__init__(self, engine=engine, user_models_dir=user_models_dir)
