"""Benchmark harness: methods behind one call, timing/memory/accuracy measurement, training recipe, speed study,
Markdown report and plots (``python -m monai_ipear.benchmark``)."""

from .harness import PeakMemory, run_benchmark, time_call
from .methods import METHOD_NAMES, BenchmarkMethod, VoxelMorphDDF, build_method, make_network
from .report import format_report, machine_description, mean_sd, summarize
from .speed import speed_study
