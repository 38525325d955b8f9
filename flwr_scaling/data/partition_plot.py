"""A heatmap of how the labels are divided among the clients (flwr-datasets' plot)."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from flwr_scaling.data.federated import PartitionSpec, cut_partition, partitioner_for


# Columns drawn at most: a wider heatmap is unreadable, and counting the labels of every partition is
# what the plot's time goes into (3.4 s of a 1,000-client simulation's start-up, benchmarks/scale.py).
MAX_PLOTTED_CLIENTS = 100
VERBOSE_NAMES_NOTICE = "The verbose names can not be established"


def plot_title(spec: PartitionSpec) -> str:
    """E.g. ``digits: 10 clients, dirichlet (alpha 0.5), seed 0`` (``first 100 of 1000 clients`` beyond 100)."""
    clients = (f"{spec.num_partitions} clients" if spec.num_partitions <= MAX_PLOTTED_CLIENTS
               else f"first {MAX_PLOTTED_CLIENTS} of {spec.num_partitions} clients")
    return f"{spec.data.dataset}: {clients}, {spec.describe()}, seed {spec.data.seed}"


def plot_partitions(spec: PartitionSpec, path: str | os.PathLike) -> Path:
    """Write the label-distribution heatmap of ``spec``'s partition to ``path`` (PNG); return the path.

    The file appears whole or not at all (written beside it, then renamed).
    Impossible settings raise the same one-line ValueError as ``load_partition``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; a no-op if pyplot already uses Agg
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions

    cut_partition(spec, 0)  # checks the settings and cuts the partition (one-line errors)
    partitioner = partitioner_for(spec)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    plotted = min(spec.num_partitions, MAX_PLOTTED_CLIENTS)
    width = min(4.0 + 0.35 * plotted, 40.0)
    # flwr-datasets warns at every plot that the label column is no ClassLabel (so the ids are the labels'
    # names); a lasting filter for that one notice, not catch_warnings: simulate draws this on a thread
    # while others run, and catch_warnings swaps the process-wide filter list.
    warnings.filterwarnings("ignore", message=VERBOSE_NAMES_NOTICE, category=UserWarning)
    fig, _, _ = plot_label_distributions(
        partitioner,
        label_name="label",
        plot_type="heatmap",
        size_unit="absolute",
        max_num_partitions=plotted,
        partition_id_axis="x",
        figsize=(width, 5.0),
        title=plot_title(spec),
        legend=True,
        legend_title="examples",
        plot_kwargs={"annot": spec.num_partitions <= 20},
    )
    fig.axes[0].set_xlabel("client (partition id)")
    fig.axes[0].set_ylabel("label")
    fig.tight_layout()
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            fig.savefig(out, format="png", dpi=100)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; as readable as the run's other outputs (run.outdir)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return target
