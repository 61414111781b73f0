"""What can be checked of the Slicer module without the Slicer application: the module file imports
without torch and without the engine, the widget only uses names the .ui file defines, the packaging
lists every Python file, and the extension metadata is consistent."""
import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SynomalyDetection"
MODULE_FILE = MODULE_DIR / "SynomalyDetection.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SynomalyDetection.ui"
ENGINE_DIR = ROOT / "SynomalyEngine" / "synomaly"


def ui_widgets():
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def test_widget_code_uses_only_names_defined_in_the_ui_file():
    used = set(re.findall(r"\bui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the widget code should use the .ui widgets through self.ui"
    missing = used - set(ui_widgets())
    assert not missing, f"not in {UI_FILE.name}: {sorted(missing)}"


def test_ui_file_has_the_expected_controls_with_slicer_widget_classes():
    widgets = ui_widgets()
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "maskSelector": "qMRMLNodeComboBox",
        "severalInputsCheckBox": "QCheckBox", "inputVolumesSelector": "qMRMLCheckableNodeComboBox",
        "modelComboBox": "QComboBox", "detectButton": "QPushButton", "cancelDetectionButton": "QPushButton",
        "detectionProgressBar": "QProgressBar", "advancedCollapsibleButton": "ctkCollapsibleButton",
        "deviceComboBox": "QComboBox", "stagesSpinBox": "QSpinBox", "noiseLevelSpinBox": "QSpinBox",
        "thresholdSpinBox": "QDoubleSpinBox", "ensembleSpinBox": "QSpinBox", "updateOutputsCheckBox": "QCheckBox",
        "reportLabel": "QLabel", "trainingFolderButton": "ctkDirectoryButton",
        "trainingVolumesSelector": "qMRMLCheckableNodeComboBox", "presetComboBox": "QComboBox",
        "stepsSpinBox": "QSpinBox", "trainingDeviceComboBox": "QComboBox", "modelNameLineEdit": "QLineEdit",
        "startTrainingButton": "QPushButton", "resumeTrainingButton": "QPushButton",
        "cancelTrainingButton": "QPushButton", "trainingProgressBar": "QProgressBar",
    }
    for name, cls in expected.items():
        assert widgets.get(name) == cls, name
    tree = ET.parse(UI_FILE)
    custom = {c.findtext("class") for c in tree.iter("customwidget")}
    non_qt = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert non_qt <= custom, f"declare as custom widgets: {sorted(non_qt - custom)}"
    receivers = {c.findtext("receiver") for c in tree.iter("connection")}
    mrml_widgets = {n for n, cls in widgets.items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert mrml_widgets <= receivers, "every MRML widget must get the scene from the module widget"


def python_files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def cmake_list(text, variable):
    match = re.search(rf"set\({variable}\n(.*?)\n  \)", text, re.S)
    assert match, f"{variable} not found"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_module_cmakelists_lists_every_python_file_of_the_module_and_the_engine():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = {s.replace("${MODULE_NAME}", "SynomalyDetection") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    assert scripts == python_files(MODULE_DIR), "update MODULE_PYTHON_SCRIPTS in SynomalyDetection/CMakeLists.txt"
    engine = set(cmake_list(text, "ENGINE_PYTHON_SCRIPTS"))
    assert engine == python_files(ENGINE_DIR), "update ENGINE_PYTHON_SCRIPTS in SynomalyDetection/CMakeLists.txt"
    for resource in cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "SynomalyDetection")).is_file(), resource
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


STUB_SLICER = """
cmake_minimum_required(VERSION 3.16)
project(StubSlicerExtension NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING ON)
# Where ctkMacroCompilePythonScript copies each script: relative paths below the module source folder,
# absolute paths keep their place relative to the module build folder.
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  set(destination ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(IS_ABSOLUTE ${file})
      set(src ${file})
      file(RELATIVE_PATH target ${CMAKE_CURRENT_BINARY_DIR} ${file})
    else()
      set(src ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      set(target ${file})
    endif()
    if(NOT EXISTS ${src})
      message(FATAL_ERROR "missing ${src}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/installed.txt "${destination}/${target}\\n")
  endforeach()
endfunction()
function(slicer_add_python_unittest)
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${ARGN}\\n")
endfunction()
add_subdirectory(@MODULE_DIR@ SynomalyDetection)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_module_cmakelists_configures_and_puts_the_engine_beside_the_module(tmp_path):
    """The real CMakeLists with Slicer's macros replaced by stubs that record where files would land."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(STUB_SLICER.replace("@MODULE_DIR@", MODULE_DIR.as_posix()))
    build = tmp_path / "build"
    run = subprocess.run(["cmake", "-S", str(source), "-B", str(build)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    destination = build / "lib/Slicer-5.8/qt-scripted-modules"
    installed = {Path(line).relative_to(destination).as_posix()
                 for line in (build / "installed.txt").read_text(encoding="utf-8").split()}
    expected = python_files(MODULE_DIR) | {f"synomaly/{f}" for f in python_files(ENGINE_DIR)}
    expected |= {"Resources/Icons/SynomalyDetection.png", "Resources/UI/SynomalyDetection.ui"}
    assert installed == expected
    assert "SCRIPT;SynomalyDetection.py" in (build / "unittests.txt").read_text(encoding="utf-8")
    for engine_file in python_files(ENGINE_DIR):
        copied = build / "SynomalyDetection" / "synomaly" / engine_file
        assert copied.read_bytes() == (ENGINE_DIR / engine_file).read_bytes()


def test_extension_metadata_is_consistent():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "add_subdirectory(SynomalyDetection)" in text
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert f"set(EXTENSION_{variable} " in text
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', text).group(1)
    entry = json.loads((ROOT / "SynomalyDetection.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == category
    assert {"$schema", "scm_url", "category"} <= set(entry)


def test_icons_are_128_pixel_pngs():
    Image = pytest.importorskip("PIL.Image")
    for path in (ROOT / "SynomalyDetection.png", MODULE_DIR / "Resources/Icons/SynomalyDetection.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path


def test_no_module_level_torch_import_in_the_module_or_its_lib():
    for path in [MODULE_FILE, *sorted((MODULE_DIR / "SynomalyDetectionLib").glob("*.py"))]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("torch", "synomaly") for n in names), f"{path.name}: {names}"


IMPORT_CHECK = """
import sys, types
# Stand-ins for what only the Slicer application provides (Qt bindings, translations and the
# scripted-module bases, which call super().__init__() as Slicer's do).
qt = types.ModuleType("qt")
sys.modules["qt"] = qt
import slicer
i18n = types.ModuleType("slicer.i18n")
i18n.tr = lambda text: text
i18n.translate = lambda context, text: text
sys.modules["slicer.i18n"] = i18n
slm = types.ModuleType("slicer.ScriptedLoadableModule")
class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        super().__init__()
        self.parent = parent
        if not parent:
            self.setup()
class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.base_inits = getattr(self, "base_inits", 0) + 1
class ScriptedLoadableModuleTest:
    pass
for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest):
    setattr(slm, cls.__name__, cls)
sys.modules["slicer.ScriptedLoadableModule"] = slm
slicer.ScriptedLoadableModule = slm
sys.path.insert(0, sys.argv[1])
import SynomalyDetection as m
heavy = sorted(n for n in ("torch", "synomaly", "safetensors") if n in sys.modules)
assert not heavy, f"importing the module imported {heavy}"
parent = types.SimpleNamespace()
m.SynomalyDetection(parent)
assert parent.title == "Synomaly Detection", parent.title
assert parent.categories and parent.contributors
for needle in ("arXiv:2411.04004", "Medical Image Analysis", "Synomaly Noise and Multi-Stage Diffusion",
               "Detect anomalies", "Retrain", "logic.detect(", 'getModuleLogic("SynomalyDetection")'):
    assert needle in parent.helpText + parent.acknowledgementText, needle

import SynomalyDetectionLib.Logic as lib_logic
inits = []
original = lib_logic.SynomalyLogic.__init__
def counted(self, *args, **kwargs):
    inits.append(1)
    original(self, *args, **kwargs)
lib_logic.SynomalyLogic.__init__ = counted
logic = m.SynomalyDetectionLogic(user_models_dir="/nonexistent")
assert callable(logic.detect) and callable(logic.train) and logic.loss_curve is None
assert len(inits) == 1, f"SynomalyLogic.__init__ ran {len(inits)} times"
assert logic.base_inits == 1, f"ScriptedLoadableModuleLogic.__init__ ran {logic.base_inits} times"
assert str(logic.user_models_dir) == "/nonexistent"

def setup(self):
    self.ui, self.logic, self._timer = "ui", "logic", "timer"
m.SynomalyDetectionWidget.setup = setup
widget = m.SynomalyDetectionWidget()
assert (widget.ui, widget.logic, widget._timer) == ("ui", "logic", "timer"), "__init__ undid setup()"
assert widget._job is None and widget.Observations == []
print("ok")
"""


def _literal_text(node) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                and bool(node.value.strip()))


def test_user_visible_strings_go_through_tr():
    """As current Slicer modules do: labels, tooltips, titles and dialog texts are translatable."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    untranslated = []
    for name in ("SynomalyDetection", "SynomalyDetectionWidget"):
        for node in ast.walk(classes[name]):
            if isinstance(node, ast.Assign) and _literal_text(node.value):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr in (
                            "text", "toolTip", "title", "helpText", "acknowledgementText"):
                        untranslated.append(f"line {node.lineno}: .{target.attr} = {ast.unparse(node.value)[:40]}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith(
                    "Display"):
                texts = node.args[:1] + [k.value for k in node.keywords if k.arg == "windowTitle"]
                untranslated += [f"line {node.lineno}: {ast.unparse(t)[:40]}" for t in texts if _literal_text(t)]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "addItem":
                untranslated += [f"line {node.lineno}: {ast.unparse(a)[:40]}" for a in node.args[:1]
                                 if _literal_text(a)]
    assert not untranslated, "wrap in _() (slicer.i18n.tr): " + "; ".join(untranslated)
    module_init = next(n for n in classes["SynomalyDetection"].body if isinstance(n, ast.FunctionDef))
    assigned = {t.attr: node.value for node in ast.walk(module_init) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Attribute)}
    for attr in ("title", "helpText", "acknowledgementText"):
        call = assigned[attr]
        call = call.func.value if isinstance(call.func, ast.Attribute) else call  # _("...").format(...)
        assert isinstance(call, ast.Call) and getattr(call.func, "id", "") == "_", attr


def test_module_file_imports_without_torch_and_describes_itself():
    """Import the real module file in a fresh interpreter, with stand-ins for the Qt-only Slicer parts."""
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(IMPORT_CHECK), str(MODULE_DIR)],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_lib_imports_without_torch():
    pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import SynomalyDetectionLib; "
            "heavy = [n for n in ('torch', 'synomaly') if n in sys.modules]; assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# issue 20: what the Extensions Index checks, packaging, and the Qt-side fixes read from the sources


def cmake_value(text, variable):
    return re.search(rf'set\({variable} "([^"]*)"\)', text).group(1)


def test_extensions_index_requirements():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "SynomalyEngine" / "pyproject.toml").read_text()
    assert "set(EXTENSION_LICENSE_FILE ${CMAKE_CURRENT_SOURCE_DIR}/LICENSE)" in text
    assert re.fullmatch(r"https://\S+\.png", cmake_value(text, "EXTENSION_SCREENSHOTURLS"))
    for contributor in cmake_value(text, "EXTENSION_CONTRIBUTORS").split(","):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor.strip()), f"'Name (Organisation)': {contributor}"
    assert cmake_value(text, "EXTENSION_HOMEPAGE").startswith("https://")
    assert "DOCUMENTATION_URL" in MODULE_FILE.read_text(encoding="utf-8") and "{docs}" in MODULE_FILE.read_text()


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("git") is None, reason="needs cmake and git")
@pytest.mark.parametrize("remote", [None, "https://github.com/synomaly/SlicerSynomalyDetection.git"])
def test_packaging_without_a_git_remote_skips_only_the_description(tmp_path, remote):
    """The block of the top-level CMakeLists, run by cmake in a git checkout with and without 'origin'."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    block = text[text.index("# BEGIN git-remote-check"):text.index("# END git-remote-check")]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    if remote:
        subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", remote], check=True)
    script = tmp_path / "check.cmake"
    script.write_text(f'set(CMAKE_CURRENT_SOURCE_DIR "{tmp_path.as_posix()}")\n{block}\n'
                      'message(STATUS "skip=[${Slicer_CPACK_SKIP_GENERATE_EXTENSION_DESCRIPTION}]")\n')
    run = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert ("skip=[ON]" if remote is None else "skip=[]") in run.stdout + run.stderr


def test_bundled_models_are_installed_once():
    """ctkMacroCompilePythonScript installs the module's whole build folder; no second install() rule."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    rules = [line for line in text.splitlines() if line.strip().startswith("install(")]
    assert "file(COPY ${ENGINE_MODEL_FILES}" in text and rules == []


def widget_source():
    return MODULE_FILE.read_text(encoding="utf-8")


def test_the_folder_button_follows_every_pick_and_never_shows_the_working_directory():
    source = widget_source()
    assert 'trainingFolderButton.connect("directorySelected(QString)"' in source
    assert "directoryChanged(QString)" not in source
    assert "trainingFolderButton.text = " in source, "a label instead of Slicer's working directory"


def test_the_widget_never_blocks_on_a_job_and_hides_its_outputs():
    source = widget_source()
    cleanup = source[source.index("    def cleanup(self):"):source.index("    def enter(self):")]
    assert "_stopJob(release=True)" in cleanup
    assert "sortFilterProxyModel().hiddenNodeIDs = hidden" in source
    bridge = (MODULE_DIR / "SynomalyDetectionLib" / "MrmlBridge.py").read_text(encoding="utf-8")
    assert 'not shown_in_layout(outputs.input_node.GetScene(), ("Red", "Yellow"))' in bridge, "keep the user's layout"
    assert "show_results(results[-1], slicer.app.layoutManager())" in source
    poll = source[source.index("    def _pollJob(self):"):source.index("    def _cancelling(self)")]
    assert "except" not in poll, "poll() fails the job itself; nothing to re-raise from a stop path"
    assert "resumeTrainingButton" in source and "training_blocker(parameters, resume)" in source


def test_the_self_test_drops_its_module_manager_connection():
    source = (MODULE_DIR / "SynomalyDetectionLib" / "SelfTest.py").read_text(encoding="utf-8")
    assert 'disconnect("moduleAboutToBeUnloaded(QString)"' in source
    assert "from SynomalyDetectionLib.SelfTest import SynomalyDetectionTest" in widget_source()


def test_windows_kill_runs_without_a_console_window():
    source = (MODULE_DIR / "SynomalyDetectionLib" / "JobRunner.py").read_text(encoding="utf-8")
    taskkill = source[source.index('["taskkill"'):]
    assert "creationflags=subprocess.CREATE_NO_WINDOW" in taskkill[:300]


def test_new_panel_controls_are_in_the_ui_file():
    widgets = ui_widgets()
    for name, cls in {"runLogCollapsibleButton": "ctkCollapsibleButton", "runLogTextEdit": "QPlainTextEdit",
                      "runTimeLabel": "QLabel", "dependenciesCollapsibleButton": "ctkCollapsibleButton",
                      "dependenciesLabel": "QLabel", "upgradeDependenciesButton": "QPushButton",
                      "deviceHintLabel": "QLabel", "verifyModelButton": "QToolButton",
                      "deleteModelButton": "QToolButton"}.items():
        assert widgets.get(name) == cls, name


def test_several_volumes_are_checked_in_the_panel_and_run_by_the_batch_of_detect_many():
    """qMRMLCheckableNodeComboBox's checkedNodes(), setCheckState(), nodeCount(), nodeFromIndex() and
    checkedNodesChanged() are in Slicer 5.6 to 5.10 (Libs/MRML/Widgets, read at those tags)."""
    widgets = ui_widgets()
    assert widgets["severalInputsCheckBox"] == "QCheckBox"
    assert widgets["inputVolumesSelector"] == "qMRMLCheckableNodeComboBox"
    source = widget_source()
    for needle in ("self.ui.inputVolumesSelector, self.ui.trainingVolumesSelector):\n"
                   '            selector.connect("checkedNodesChanged()", self.updateParameterNodeFromGUI)',
                   "parameters.input_volumes = list(self.ui.inputVolumesSelector.checkedNodes())",
                   "parameters.several_inputs = self.ui.severalInputsCheckBox.checked",
                   "set_checked_nodes(self.ui.inputVolumesSelector, parameters.input_volumes",
                   "self.logic.start_detection(", "finished_outputs(job)"):
        assert needle in source, needle
    logic = (MODULE_DIR / "SynomalyDetectionLib" / "Logic.py").read_text(encoding="utf-8")
    assert "return self.start_detection_batch(volumeNodes, maskNode, model, replace, progress" in logic
    assert "if parameters.several_inputs:\n            return self.start_detection_batch(" in logic


def test_modules_stay_under_600_lines():
    for path in [MODULE_FILE, *sorted((MODULE_DIR / "SynomalyDetectionLib").glob("*.py"))]:
        assert len(path.read_text(encoding="utf-8").splitlines()) < 600, path.name
