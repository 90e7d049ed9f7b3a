"""The config's sections: one frozen dataclass each, with its defaults, a line of doc per field
and its own checks (``_validate``)."""
from __future__ import annotations

import dataclasses

from fedms_jax import budgets as _budgets  # numpy only: the budget checks, before jax starts
from fedms_jax.choices import (
    ACCOUNTANTS, ACTIVATIONS, BACKENDS, BUDGET_MODES, CLIENT_OPTIMIZERS, DTYPES, FILE_SOURCES, GATE_INPUTS,
    GATE_MODES, HEADS, LOCAL_EXPERTS, LOCAL_LOSSES, LOCAL_STARTS, LORA_TARGETS, MIX_MODES, PARTITIONS,
    POPULATION_MODES, PRIORS, SAL_MODES, SCHEDULES, SERVER_OPTIMIZERS, STRATEGIES,
)
from fedms_jax.config.base import _Section, _check, _int


@dataclasses.dataclass(frozen=True)
class FedMSConfig(_Section):
    """FedMS (DESIGN.md section 1; every "choice" there is an option here)."""

    _key = "fedms."
    gate: str = "learned"  # learned | fixed (ablation: no gate network)
    local_weight: float = 0.5  # gate=fixed: the mixture's weight on the local expert
    gate_rank: int = _int(4)  # gate adapter bottleneck d -> r -> d
    # global_feature: the global expert's pooled feature (its head's input: deep, content
    # aware at every SAL level) | mean of the branch point's tokens | cls (its [CLS] vector)
    gate_input: str = "global_feature"
    # the gate's (adapter and head) learning rate as a multiple of client.lr: a small network
    # that gets a few steps per round on each client
    gate_lr_factor: float = 1.0
    # Fraction of each client's training examples held out from its local expert (and from the
    # global expert's training) in a round and used only to train the gate (with the experts'
    # outputs stop-gradient'ed), so the gate learns how the experts do on data the local expert
    # did not train on. 0: the gate and the experts are trained together on the same batches by
    # the mixture's loss (the original scheme).
    gate_holdout: float = 0.2
    # Move the held-out slice by its size every round the client trains, so the local expert
    # sees all of the client's data over time (false: the same slice every round)
    rotate_holdout: bool = True
    mixing: str = "probs"  # probs (mix softmaxes) | logits | residual (z_global + w_local * z_local)
    # gate_holdout=0: + aux_weight * each trained expert's own cross-entropy
    aux_weight: float = 0.0
    train_global: bool = True  # keep training (and aggregating) the global expert in stage 2
    # balanced: the global expert trains with the balanced-softmax loss (logits + the client's
    # log label prior) and each client serves it with its own log prior added; none: plain
    prior: str = "balanced"
    prior_smoothing: float = 1.0  # add-s smoothing of the client's label counts in its prior
    # stage1: the local expert trains from round 0 beside the global expert (Ditto's schedule);
    # stage2: only in stage 2
    local_start: str = "stage1"
    # Stage 2's local-expert loss: own (its own cross-entropy) | mixture (-log p_mix(y), the gate
    # and the global expert fixed: APFL's personal update; chosen against on validation)
    local_loss: str = "own"
    local_prox: float = 0.0  # + (local_prox / 2) ||local - global received||^2 (Ditto's lam)
    # own: the local expert is the client's own copy (LoRA + head) | offset: the client keeps its
    # local expert's offset from the global expert and applies it to the global expert it
    # receives each round, so its local expert follows the federation's progress
    local_expert: str = "own"

    def _validate(self) -> None:
        self._choice("gate", GATE_MODES)
        self._choice("mixing", MIX_MODES)
        self._choice("gate_input", GATE_INPUTS)
        self._choice("prior", PRIORS)
        self._choice("local_start", LOCAL_STARTS)
        self._choice("local_loss", LOCAL_LOSSES)
        self._choice("local_expert", LOCAL_EXPERTS)
        self._check(0.0 <= self.local_weight <= 1.0, "local_weight", "must be in [0, 1]")
        self._check(self.aux_weight >= 0, "aux_weight", "must be >= 0")
        self._check(self.local_prox >= 0, "local_prox", "must be >= 0")
        self._check(self.prior_smoothing > 0, "prior_smoothing", "must be > 0")
        self._check(self.gate_lr_factor > 0, "gate_lr_factor", "must be > 0")
        self._check(0.0 <= self.gate_holdout < 1.0, "gate_holdout", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class FedProxConfig(_Section):
    """FedProx's proximal term."""

    _key = "fedprox."
    mu: float = 0.01  # weight of (mu / 2) * ||w - w_global||^2 in each client's loss

    def _validate(self) -> None:
        self._check(self.mu >= 0, "mu", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class FedRepConfig(_Section):
    """FedRep (Collins et al. 2021): each round the local head is trained first with the body
    fixed, then the body (the LoRA adapters, federated) with the head fixed."""

    _key = "fedrep."
    head_fraction: float = 0.5  # share of a round's local steps spent on the head (first)

    def _validate(self) -> None:
        self._check(0.0 < self.head_fraction < 1.0, "head_fraction", "must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class DittoConfig(_Section):
    """Ditto (Li et al. 2021): a personal model regularised toward the global one."""

    _key = "ditto."
    lam: float = 0.1  # weight of (lam / 2) * ||v - w_global||^2 in the personal model's loss

    def _validate(self) -> None:
        self._check(self.lam >= 0, "lam", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """The dataset, its subsets and its partition over the clients."""

    _key = "data."
    name: str = "digits"  # digits | synthetic | idx | folder | a TFDS name
    data_dir: str = ""  # idx: the IDX files; folder: root/{train,test}/<class>/; TFDS: its data_dir
    num_clients: int = _int(20)  # clients the training split is partitioned over
    partition: str = "dirichlet"  # dirichlet | shards | iid
    alpha: float = 0.3  # partition=dirichlet: concentration (smaller: more skewed labels)
    min_examples: int = _int(16)  # partition=dirichlet: the fewest training examples a client gets
    shards_per_client: int = _int(2)  # partition=shards: label-sorted shards per client
    image_size: int = _int(0, lo=0)  # data.name=folder: resize every image to this size (0: keep; all must match)
    train_examples: int = _int(0, lo=0)  # a stratified, seeded subset of the training split (0: all of it)
    test_examples: int = _int(0, lo=0)  # likewise for the test split (personalised and global evaluation)
    # model.frozen_blocks > 0: a directory where the frozen stem's tokens of the (subsampled)
    # train and test images are kept, keyed by a hash of images, backbone and preprocessing ("": none)
    feature_cache: str = ""
    # > 0: the tuning protocol. This fraction of each client's training examples becomes its
    # validation split; personalised evaluation runs on those and global evaluation on their
    # union, and the test split is never used (hyper-parameters are chosen on these numbers)
    validation: float = 0.0
    # data.name=idx|folder: the most bytes the decoded data may take (checked from the IDX
    # headers and the image headers before anything is decompressed or decoded); 0: half the
    # memory available when the run starts
    max_bytes: int = _int(0, lo=0)

    def _validate(self) -> None:
        self._choice("partition", PARTITIONS)
        self._check(0.0 <= self.validation < 1.0, "validation", "must be in [0, 1)")
        self._check(self.alpha > 0, "alpha", "must be > 0")
        self._check(self.name not in FILE_SOURCES or bool(self.data_dir), "data_dir",
                    f"data.name={self.name!r} reads local files: name their directory")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """The frozen backbone and the classifier head."""

    _key = "model."
    pretrained: str = ""  # hub id or local directory; "" = random ViT of the shape below
    image_size: int = _int(16)  # input resolution (a pretrained model's position embeddings are resized to it)
    patch_size: int = _int(4)  # random ViT: patch side in pixels
    hidden: int = _int(64)  # random ViT: width d
    layers: int = _int(4)  # random ViT: transformer blocks L
    heads: int = _int(4)  # random ViT: attention heads
    mlp_dim: int = _int(128)  # random ViT: MLP width
    hidden_act: str = "gelu"  # random ViT: MLP activation
    dtype: str = "float32"  # float32 | bfloat16: the compute dtype
    head: str = "linear"  # linear | zero_shot (CLIP: class-prompt text embeddings)
    tune_head: bool = False  # zero_shot only: train the text classifier too (linear always is)
    prompt: str = "a photo of a {}."  # zero_shot: the class prompt template
    # F: blocks [0, F) are frozen for every method (no LoRA below block F) and run once per image
    # before training (data.feature_cache keeps their output); the federated model is blocks [F, L)
    frozen_blocks: int = _int(0, lo=0)
    # run a range of blocks as one lax.scan over their stacked params (compile time independent
    # of depth); False unrolls them (same parameters, same outputs)
    scan_layers: bool = True
    # rematerialise each block in the backward pass (jax.checkpoint): training keeps one token
    # state per block instead of every block's activations, for about a third more FLOPs; the
    # same values and gradients (what lets a ViT-L client's batch fit a TPU's HBM: docs/sharding-and-plan.md)
    remat: bool = False

    def _validate(self) -> None:
        self._choice("dtype", DTYPES)
        # A pretrained backbone's depth is known only once it is loaded (run.build checks then).
        self._check(self.frozen_blocks < self.layers or bool(self.pretrained), "frozen_blocks",
                    f"must be < model.layers={self.layers} (at least one block must be trainable)")
        self._choice("head", HEADS)
        self._choice("hidden_act", ACTIVATIONS)
        self._check(self.hidden % self.heads == 0, "hidden", f"must be divisible by model.heads={self.heads}")
        self._check(self.image_size % self.patch_size == 0, "image_size",
                    f"must be divisible by model.patch_size={self.patch_size}")
        self._check("{}" in self.prompt, "prompt", "must contain '{}' for the class name")
        self._check(self.head == "linear" or bool(self.pretrained), "head",
                    "'zero_shot' needs a CLIP checkpoint in model.pretrained")


@dataclasses.dataclass(frozen=True)
class LoRAConfig(_Section):
    """The LoRA adapters: y = x W + b + (alpha / rank) * dropout(x) A B."""

    _key = "lora."
    rank: int = _int(8)  # r, the inner dimension of A [in, r] and B [r, out]
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (0: none)
    targets: tuple[str, ...] = LORA_TARGETS  # the Dense layers of each block that get an adapter

    def _validate(self) -> None:
        self._check(self.alpha > 0, "alpha", "must be > 0")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        self._check(not bad and len(self.targets) > 0, "targets", f"each must be one of {list(LORA_TARGETS)}")
        self._check(len(set(self.targets)) == len(self.targets), "targets", "names a layer twice")


@dataclasses.dataclass(frozen=True)
class SALConfig(_Section):
    """SAL: which top blocks' LoRA is active at each round (fedms_jax/sal.py)."""

    _key = "sal."
    mode: str = "progressive"  # progressive: k = k0 + step * (round // every) | all: every block | fixed: k0
    k0: int = _int(1)  # active top blocks at round 0
    step: int = _int(1)  # progressive: blocks added each time
    every: int = _int(3)  # progressive: rounds between additions
    # Budget-aware SAL (fedms_jax/budgets.py): blocks per compute tier, increasing (empty: every
    # client trains the k(t) blocks); a client of budget b trains the top min(k(t), b) blocks
    budgets: tuple[int, ...] = ()
    budget_shares: tuple[float, ...] = ()  # each tier's share of the clients, summing to 1 (empty: equal)
    # static: a client's tier is fixed | dynamic: drawn anew every round | deadline: no tiers; each
    # selected client trains the most top blocks it can finish by system.deadline_s (fedms_jax/system.py)
    budget_mode: str = "static"

    def _validate(self) -> None:
        self._choice("mode", SAL_MODES)
        self._choice("budget_mode", BUDGET_MODES)
        for key, value, what in _budgets.problems(self.budgets, self.budget_shares, self.budget_mode):
            _check(False, key, value, what)


@dataclasses.dataclass(frozen=True)
class ClientConfig(_Section):
    """Local training on each client of the cohort."""

    _key = "client."
    local_steps: int = _int(10)  # optimizer steps per client per round (when epochs = 0)
    # > 0: E passes over each client's training examples per round, without replacement, in
    # batches of batch_size (the last partial batch masked; a client with fewer examples than
    # the largest runs no-op steps at the end). 0: local_steps batches drawn with replacement.
    epochs: int = _int(0, lo=0)
    batch_size: int = _int(32)  # examples per local step
    optimizer: str = "adamw"  # sgd | momentum | adamw
    lr: float = 3e-3  # the local learning rate (the schedule's peak)
    momentum: float = 0.9  # optimizer=momentum: its coefficient
    weight_decay: float = 0.0  # optimizer=adamw: its decoupled weight decay
    schedule: str = "constant"  # constant | cosine (decays to 0 over one round's local steps)
    # Run the frozen part of the loss (SAL trunk; FedMS's frozen global expert) once per round
    # over a client's examples instead of every step, when it holds no more examples than its
    # steps process (max examples <= local_steps * batch_size). Same math, less work.
    cache_frozen: bool = True

    def _validate(self) -> None:
        self._choice("optimizer", CLIENT_OPTIMIZERS)
        self._choice("schedule", SCHEDULES)
        self._check(self.lr > 0, "lr", "must be > 0")


@dataclasses.dataclass(frozen=True)
class ServerConfig(_Section):
    """The server's update from the cohort's averaged delta."""

    _key = "server."
    optimizer: str = "fedavg"  # fedavg (SGD, lr 1) | fedadam
    lr: float = 1.0  # the server optimizer's learning rate (FedAdam: typically 1e-3 to 1e-1)

    def _validate(self) -> None:
        self._choice("optimizer", SERVER_OPTIMIZERS)
        self._check(self.lr > 0, "lr", "must be > 0")
        # lr 1 is FedAvg's (the new model is the clients' mean); Adam steps of size 1 per
        # coordinate throw the model away. Almost always server.lr was left at its default.
        self._check(not (self.optimizer == "fedadam" and self.lr == 1.0), "lr",
                    "is FedAvg's server learning rate; with config.server.optimizer = 'fedadam' each Adam step "
                    "moves every coordinate by up to lr: set config.server.lr (e.g. 0.01)")


@dataclasses.dataclass(frozen=True)
class DPConfig(_Section):
    """User-level differential privacy: DP-FedAvg (McMahan et al. 2018; fedms_jax/privacy.py).

    Each client's upload (every unit it sends, together) is clipped to L2 norm ``clip``; the
    server adds N(0, (noise_multiplier * clip)^2) to each coordinate of the sum and divides by
    the number of clients that were asked to train the unit (public, fixed by the cohort). The
    cohort is a fixed-size uniform sample without replacement. Epsilon at ``delta`` is reported
    in every metrics line."""

    _key = "dp."
    clip: float = 0.0  # L2 bound of a client's upload; 0 = no differential privacy
    noise_multiplier: float = 0.0  # z: the noise's std is z * clip (on the sum)
    # > 0: calibrate noise_multiplier before the run so that epsilon after all rounds is this
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | pld (dp-accounting's Renyi DP or privacy-loss-distribution accountant)
    # false: the noise and the cohorts come from a secret drawn from the OS, kept in memory only
    # (a resumed run draws a new one). true: from config.seed, so anyone with the config can
    # regenerate and subtract the noise -- for tests; every metrics line then says so
    reproducible_noise: bool = False
    # metrics computed from the clients' raw data (training loss, personalised accuracy, update
    # norms, ...) are not covered by epsilon: under DP they are left out of metrics.jsonl, and
    # written to WORKDIR/metrics_not_private.jsonl only when this is true
    raw_metrics: bool = False

    @property
    def enabled(self) -> bool:
        return self.clip > 0

    def _validate(self) -> None:
        self._choice("accountant", ACCOUNTANTS)
        self._check(self.clip >= 0, "clip", "must be >= 0 (0: no differential privacy)")
        self._check(self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0")
        self._check(self.target_epsilon >= 0, "target_epsilon", "must be >= 0 (0: use dp.noise_multiplier)")
        self._check(0 < self.delta < 1, "delta", "must be in (0, 1)")
        if not self.enabled:
            self._check(self.noise_multiplier == 0, "noise_multiplier", "needs config.dp.clip > 0 (the noise is z * clip)")
            self._check(self.target_epsilon == 0, "target_epsilon", "needs config.dp.clip > 0")
        self._check(not (self.target_epsilon > 0 and self.noise_multiplier > 0), "noise_multiplier",
                    f"is calibrated from config.dp.target_epsilon = {self.target_epsilon}: set one of the two")


@dataclasses.dataclass(frozen=True)
class GuardConfig(_Section):
    """When a diverged run stops (fedms_jax/run.py): a server state that is not finite after an
    update stops it at once; so do this many consecutive rounds in which every client's update
    was excluded (non-finite)."""

    _key = "guard."
    max_bad_rounds: int = _int(3)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Checkpoints in WORKDIR/checkpoints (fedms_jax/checkpoint.py)."""

    _key = "checkpoint."
    every: int = _int(6, lo=0)  # rounds between checkpoints (0: only on preemption and at the end)
    keep: int = _int(3)  # newest checkpoints kept
    asynchronous: bool = True  # orbax writes in the background


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """The device mesh ('clients', 'model') and how the backbone is laid out on it."""

    _key = "mesh."
    clients: int = _int(0, lo=0)  # devices on the 'clients' axis; 0 = all devices / mesh.model
    model: int = _int(1)  # devices on the 'model' axis (the backbone's split)
    strategy: str = "replicated"  # replicated | fsdp | tensor (fedms_jax/federated/sharding.py)

    def _validate(self) -> None:
        self._choice("strategy", STRATEGIES)
        self._check(self.strategy != "replicated" or self.model == 1, "strategy",
                    f"'replicated' puts the whole backbone on every device: needs mesh.model=1, got {self.model}")


@dataclasses.dataclass(frozen=True)
class PlacementConfig(_Section):
    """How a cohort's clients are run on the devices."""

    _key = "placement."
    backend: str = "vmap"  # vmap | sequential
    # Clients per vmapped chunk; 0 = auto (fedms_jax/perf.py: cache-sized on CPU, whole cohort on GPU/TPU).
    chunk_size: int = _int(0, lo=0)

    def _validate(self) -> None:
        self._choice("backend", BACKENDS)


@dataclasses.dataclass(frozen=True)
class CompileConfig(_Section):
    """When and where the run's programs are compiled (fedms_jax/compiling.py)."""

    _key = "compile."
    # lower and compile every round and evaluation program the run will need in background
    # threads while the first rounds run (False: each when first used)
    ahead: bool = True
    threads: int = _int(0, lo=0)  # compile threads; 0 = auto (half the host's cores, 1 to 8)
    cache: bool = True  # JAX's persistent compilation cache: a repeated or resumed run compiles nothing
    # the cache's directory; "" = $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/fedms_jax/jax
    cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class PopulationConfig(_Section):
    """Where the population's client data and persistent states live (fedms_jax/federated/population.py).

    ``device``: every client's padded data and state on the devices (the fastest; small
    populations). ``streamed``: the data in host memory, unpadded; the states on disk
    (``WORKDIR/client_store``); each round's cohort is gathered (padded to the smallest of a few
    bucket sizes that holds its largest client), transferred while the round before runs, and its
    new states written back in the background; checkpoints write only the clients that changed.
    ``auto``: streamed when the device copy would take more than a quarter of a device's memory
    (of the host's on CPU) or the population exceeds 10,000 clients."""

    _key = "population."
    mode: str = "auto"  # auto | device | streamed
    buckets: int = _int(4)  # streamed: padded client sizes (powers of two down from the largest client)
    # personalised evaluation over this many clients (a seeded sample, the same every evaluation);
    # 0 = auto: every client up to 1024 of them, else a sample of 1024
    eval_sample: int = _int(0, lo=0)
    prefetch: bool = True  # streamed: gather the next cohort while the round runs

    def _validate(self) -> None:
        self._choice("mode", POPULATION_MODES)


@dataclasses.dataclass(frozen=True)
class MultihostConfig(_Section):
    """Jobs of several processes (fedms_jax/distributed.py)."""

    _key = "multihost."
    # how long a process waits for the others (agreement after each round, the coordination
    # service's heartbeat): a process that died is noticed within about this long
    timeout_s: int = _int(300)

