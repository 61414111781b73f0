"""The training loss as a Slicer plot: a table node (step, loss) drawn by a plot chart node.

Points are added without notifying the scene; ``flush()`` (once per poll of the worker) tells the plot
to redraw, and thins out the oldest points past ``MAX_POINTS``: a redraw per training step, or a
table of a hundred thousand rows, would make Slicer crawl during a long run.
"""
import math

import slicer
import vtk

CHART_ROLE = "SynomalyLossChart"
MAX_POINTS = 2000


class LossCurve:
    def __init__(self, scene, table=None, title="Synomaly training loss"):
        """Reuse ``table`` (and its chart) from an earlier run, or create the nodes."""
        self.scene = scene
        self.table = table if table is not None and table.GetScene() is scene else None
        self.chart = self.table.GetNodeReference(CHART_ROLE) if self.table is not None else None
        if self.table is None or self.chart is None:
            self._create(title)

    def _create(self, title) -> None:
        self.table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(title))
        for name in ("step", "loss"):
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            self.table.GetTable().AddColumn(column)
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.table.GetName()} series")
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName("loss")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        self.chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{self.table.GetName()} chart")
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.chart.SetTitle(title)
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss (mean of the last 50 steps)")
        self.chart.SetLegendVisibility(False)
        self.table.SetNodeReferenceID(CHART_ROLE, self.chart.GetID())

    def _columns(self):
        table = self.table.GetTable()
        return table.GetColumnByName("step"), table.GetColumnByName("loss")

    def clear(self) -> None:
        self.table.GetTable().SetNumberOfRows(0)
        self.table.Modified()

    def add(self, step: int, loss: float) -> None:
        """Append a point, drawn at the next ``flush()``; a NaN loss (before the first step) is not drawn."""
        if loss is None or math.isnan(loss):
            return
        steps, losses = self._columns()
        if steps.GetNumberOfTuples() and steps.GetValue(steps.GetNumberOfTuples() - 1) >= step:
            return
        steps.InsertNextValue(float(step))
        losses.InsertNextValue(float(loss))

    def flush(self) -> None:
        """Redraw once for the points added since the last flush; past MAX_POINTS, every other point of the
        older half is dropped (the newest stay dense)."""
        steps, losses = self._columns()
        count = steps.GetNumberOfTuples()
        was_modifying = self.table.StartModify()
        if count > MAX_POINTS:
            keep = list(range(0, count // 2, 2)) + list(range(count // 2, count))
            values = [(steps.GetValue(i), losses.GetValue(i)) for i in keep]
            self.table.GetTable().SetNumberOfRows(len(values))
            for row, (step, loss) in enumerate(values):
                steps.SetValue(row, step)
                losses.SetValue(row, loss)
        steps.Modified()
        losses.Modified()
        self.table.GetTable().Modified()
        self.table.Modified()
        self.table.EndModify(was_modifying)

    def points(self):
        steps, losses = self._columns()
        return [(steps.GetValue(i), losses.GetValue(i)) for i in range(steps.GetNumberOfTuples())]
