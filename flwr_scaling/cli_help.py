"""The help text of every run option, generated from the registries and ``RunConfig``.

Each option's help is its meaning (``DESCRIPTIONS``, the one hand-written
part), its valid values (read from the method and rule registries and the
data, partitioner, model and encoding lists) and its default (``RunConfig``'s,
or for a ``None`` default the per-method and per-rule values of the
registries). A registered rule or method therefore shows up in ``--help``,
and no default is written twice.
"""

from __future__ import annotations

from dataclasses import fields

from flwr_scaling.core.devices import DEVICE_CHOICES
from flwr_scaling.core.rules import MODES, RULES
from flwr_scaling.data.hub import HUB_KIND
from flwr_scaling.data.partitioners import partitioner_names
from flwr_scaling.data.sources import named_sources, path_kinds
from flwr_scaling.methods import METHODS
from flwr_scaling.run import config as run_config
from flwr_scaling.run.config import RunConfig

# What each run option means; the choices and the default are added from where they are defined.
DESCRIPTIONS = {
    "strategy": "the method",
    "precond": "scaling rule",
    "precond_mode": "global: D̂ fixed within a round; local: clients adapt D̂ every step",
    "precond_beta": "moving-average factor of the state (rmsprop, adam, oasis), in [0, 1)",
    "precond_alpha": "lower clip of the diagonal, D̂ = max(alpha, D(v))",
    "precond_init": "warmup (v0 = mean statistic at x0) or ones (v0 = 1)",
    "precond_probes": "Hutchinson probes per step (oasis)",
    "precond_dtype": "encoding of the preconditioner state sent down and the statistic (or state) sent up "
                     "(the server keeps float32)",
    "precond_every": "send the preconditioner state every K rounds; clients reuse their cached copy in between",
    "warmup_batches": "batches per client for the warm-up statistic",
    "adam_beta1": "first-moment factor of adam, in [0, 1)",
    "momentum": "heavy-ball momentum on g/D̂, in [0, 1) (the paper has none)",
    "lr": "client step size γ (see README, Defaults)",
    "server_lr": "server step size η (1 = FedAvg)",
    "server_momentum": "server heavy ball μ on the averaged model change: m ← μ m + (mean x_m − x), x ← x + η m, "
                       "in [0, 1) (not for fedadam, fedyogi, fedadagrad)",
    "server_tau": "τ, the adaptivity of the server optimizers (fedadam, fedyogi, fedadagrad)",
    "proximal_mu": "μ of fedprox's proximal term μ/2 ||x - x_round||²",
    "partitioner": "dirichlet (by --dirichlet-alpha), iid, or shard (--shard-classes labels per client)",
    "shard_classes": "labels per client with --partitioner shard",
    "client_eval_every": "every K rounds, clients evaluate the model on their own held-out part (0: never)",
    "local_epochs": "local epochs per round",
    "batch_size": "client batch size",
    "rounds": "number of rounds",
    "num_clients": "number of clients (partitions), or auto: one per node that connects (the default of `flwr run .`)",
    "clients_per_round": "clients sampled per round",
    "dirichlet_alpha": "Dirichlet concentration of the label split (smaller = more heterogeneous)",
    "dataset": "a bundled dataset, data from files as KIND:PATH (idx:PATH is a folder), or a Hugging Face Hub "
               "dataset as hf:NAME (e.g. hf:ylecun/mnist; needs the network once, then the datasets cache)",
    "label_column": "label column of csv/parquet files",
    "test_path": "a separate test file (libsvm, csv, parquet)",
    "eval_split": "test, or validation (20% of the training split; for choosing step sizes)",
    "model": "the model",
    "device": "where models train and evaluate (each process resolves it: auto is CUDA where there is one, else the "
              "CPU); with --backend simulation clients see a GPU only with --client-gpus > 0",
    "client_cpus": "Ray CPUs per client actor (--backend simulation): the actors that run at once are cores / this",
    "client_gpus": "Ray GPUs per client actor (--backend simulation), fractional: 0.25 packs four clients on a GPU; "
                   "> 0 needs CUDA",
    "seed": "seed of every random choice (split, partition, init, batches, probes, sampling)",
    "out": "output folder",
    "wait_for_nodes_s": "how long the server waits for num-clients nodes before it gives up; in a round, how long "
                        "it waits (once) for a node that dropped out",
    "min_successful_clients": "a round with fewer accepted replies changes nothing and is recorded as failed",
    "min_available_clients": "fewest connected nodes a round goes on with; a round waits for a missing node "
                             "at most wait-for-nodes-s, once per departure, then samples among the connected ones",
    "checkpoint_every": "write a checkpoint every K rounds (0: never)",
    "input_shape": "flat csv/parquet features reshaped to this image shape, e.g. 1x8x8 (product = feature count), "
                   "so the cnn can train on them",
    "label_names": "class names of text labels in class-id order, a JSON list; found from the data (sorted) "
                   "and saved in config.json when empty",
    "screen_factor": "reject a reply whose model update or statistic norm (or, without a known bound, num-examples) "
                     "is more than K x the round's median, with at least 3 replies (0: off)",
    "max_num_examples": "largest num-examples a device may claim (deployment; 0: K x the round's median); "
                        "in simulation the partition sizes bound it",
    "aggregation": "mean (weighted by num-examples), or the element-wise median or trimmed-mean of the accepted "
                   "replies (unweighted), for models and statistics",
    "trim_fraction": "fraction of replies cut from each end by --aggregation trimmed-mean, in [0, 0.5)",
    "tensorboard": "also write TensorBoard event files (test accuracy, losses, bytes, D̂ bounds per round) under "
                   "DIR/<run folder name>; needs pip install \"flwr-scaling[tensorboard]\"",
}


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _per_item(values: dict[str, object]) -> str:
    """``{"adam": 1e-3, "oasis": 0.1, ...}`` -> ``"0.1 for oasis; 0.001 otherwise"`` (the most common value last)."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(_number(value), []).append(name)
    *rest, (common, _) = sorted(groups.items(), key=lambda item: -len(item[1]))[::-1]
    return "; ".join([f"{value} for {', '.join(names)}" for value, names in rest] + [f"{common} otherwise"])


def _lr_default() -> str:
    """The client step size per method, and per rule and mode for the methods that take the rule's."""
    groups: dict[str, list[str]] = {}
    for name, method in METHODS.items():
        if method.lr is not None:
            groups.setdefault(_number(method.lr), []).append(name)
    per_method = "; ".join(f"{lr} for {', '.join(names)}" for lr, names in groups.items())
    by_rule = ", ".join(
        f"{name} {'/'.join(_number(rule.default_lr[mode]) for mode in MODES)}"
        for name, rule in RULES.items() if rule.default_lr is not None
    )
    return f"{per_method}; otherwise per rule ({'/'.join(MODES)}): {by_rule}"


def _choices() -> dict[str, list[str]]:
    """The valid values of every choice option, read from where they are defined."""
    return {
        "strategy": [f"{name} ({m.summary})" for name, m in METHODS.items()],
        "precond": list(RULES),
        "precond_mode": list(MODES),
        "precond_init": list(run_config.INITS),
        "precond_dtype": list(run_config.PRECOND_DTYPES),
        "partitioner": list(partitioner_names()),
        "eval_split": list(run_config.EVAL_SPLITS),
        "aggregation": list(run_config.AGGREGATIONS),
        "model": list(run_config.MODELS),
        "device": list(DEVICE_CHOICES),
        "dataset": [*named_sources(), *(f"{kind}:{'NAME' if kind == HUB_KIND else 'PATH'}" for kind in path_kinds())],
    }


def _computed_defaults() -> dict[str, str]:
    """The defaults of the options whose ``RunConfig`` default is ``None`` or ``""`` (per method, rule, data)."""
    return {
        "precond": _per_item({name: m.default_precond for name, m in METHODS.items()}),
        "precond_alpha": _per_item({name: rule.default_alpha for name, rule in RULES.items()}),
        "lr": _lr_default(),
        "server_lr": _per_item({name: m.server_lr for name, m in METHODS.items()}),
        "clients_per_round": "all",
        "model": "resnet for 3x32x32 images (e.g. hf:uoft-cs/cifar10), cnn for other images (digits, idx:), "
                 "logreg otherwise",
        "input_shape": "the data's own shape",
        "label_names": "the data's text labels, sorted",
        "test_path": "20% of the data, stratified",
        "out": "runs/<label>",
        "tensorboard": "none",
    }


def option_metavars() -> dict[str, str]:
    """The placeholder of every choice option in the usage line: its valid values, ``{a,b,c}``."""
    names = {name: [choice.split(" ")[0] for choice in values] for name, values in _choices().items()}
    # A folder option shows what it takes, not its upper-cased name.
    return {"tensorboard": "DIR", **{name: "{" + ",".join(values) + "}" for name, values in names.items()}}


def compare_labels_help() -> str:
    """What ``compare --configs`` takes: every baseline by name, and the scaled methods' label pattern."""
    baselines = ", ".join(name for name, method in METHODS.items() if not method.scaled)
    scaled = " or ".join(f"{name}-<rule>-<mode>" for name, method in METHODS.items() if method.scaled)
    return (f"comma-separated labels: a baseline ({baselines}) or {scaled} with <rule> one of "
            f"{', '.join(RULES)} and <mode> one of {', '.join(MODES)}")


def option_help() -> dict[str, str]:
    """The help of every run option: its meaning, its choices and its default."""
    choices, computed = _choices(), _computed_defaults()
    text = {}
    for field in fields(RunConfig):
        parts = [DESCRIPTIONS[field.name]]
        if field.name in choices:
            parts.append(f"one of: {', '.join(choices[field.name])}")
        default = computed.get(field.name, _number(field.default))
        text[field.name] = f"{'; '.join(parts)}. Default: {default}"
    return {name: line.replace("%", "%%") for name, line in text.items()}  # argparse formats help with %
