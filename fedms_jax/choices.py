"""Every string-valued option's choices: plain tuples, no imports.

The config validates against these, and the modules that implement a choice import the same
tuple (a registry keyed by it checks at import that it implements each), so a name exists once.
"""
from __future__ import annotations

ALGORITHMS = ("fedms", "fedavg_sal", "fedavg", "fedprox", "fedper", "fedrep", "ditto", "local", "finetune")
TWO_STAGE = ("fedms", "finetune")  # algorithms with a stage 1 of ``stage1_rounds`` rounds
USES_SAL = ("fedms", "fedavg_sal")  # algorithms that follow ``sal.*``; the others train every block
GATE_MODES = ("learned", "fixed")
GATE_INPUTS = ("global_feature", "mean", "cls")
MIX_MODES = ("probs", "logits", "residual")
PRIORS = ("balanced", "none")  # fedms.prior
LOCAL_STARTS = ("stage1", "stage2")  # fedms.local_start
LOCAL_LOSSES = ("mixture", "own")  # fedms.local_loss
LOCAL_EXPERTS = ("own", "offset")  # fedms.local_expert
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")
SAL_MODES = ("progressive", "all", "fixed")
BUDGET_MODES = ("static", "dynamic", "deadline")  # sal.budget_mode (fedms_jax/budgets.py; deadline: fedms_jax/system.py)
TIER_MODES = ("static", "dynamic")  # the budget modes with tiers (budgets.ResourceModel)
SPEEDS = ("none", "lognormal", "file")  # system.speed
AVAILABILITY = ("always", "bernoulli", "trace")  # system.availability
AGGREGATIONS = ("sync", "fedbuff")  # system.aggregation
STALENESS = ("sqrt", "constant")  # system.staleness (fedms_jax/system.py)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")  # models/transformer.py
DTYPES = ("float32", "bfloat16")
HEADS = ("linear", "zero_shot")
CLIENT_OPTIMIZERS = ("sgd", "momentum", "adamw")
SCHEDULES = ("constant", "cosine")
SERVER_OPTIMIZERS = ("fedavg", "fedadam")
ACCOUNTANTS = ("rdp", "pld")
PARTITIONS = ("dirichlet", "shards", "iid")
BACKENDS = ("vmap", "sequential")
STRATEGIES = ("replicated", "fsdp", "tensor")
POPULATION_MODES = ("auto", "device", "streamed")
FILE_SOURCES = ("idx", "folder")  # data.name values that read local files from data.data_dir
