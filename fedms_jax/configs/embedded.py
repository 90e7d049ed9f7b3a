"""The offline default: FedMS on scikit-learn's digits over 20 non-IID clients (Dirichlet
alpha 0.3), with a small randomly initialised ViT and LoRA: 12 rounds of stage 1 (FedAvg + SAL
of the global expert), then 12 rounds of stage 2 (local experts + gate, MoFM).

No pretrained weights can be fetched offline, so the frozen backbone is a random ViT; set
``model.pretrained`` to a hub id or a local checkpoint directory to use real weights.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.algorithm = "fedms"  # fedms | fedavg_sal | fedavg | fedprox | fedper | fedrep | ditto | local | finetune
    c.rounds = 24  # all stages together
    c.stage1_rounds = 12  # two-stage algorithms (fedms, finetune): rounds of stage 1
    c.cohort_size = 8
    c.eval_every = 1
    c.eval_clients = 8  # clients evaluated at once (vmapped) in personalised evaluation
    c.eval_batch = 256  # test examples per evaluation batch (inside a client; global test set)

    # FedMS stage 2 (DESIGN.md section 1; every "choice" there is an option here).
    c.fedms = ml_collections.ConfigDict()
    c.fedms.gate = "learned"  # learned | fixed (ablation: no gate network)
    c.fedms.local_weight = 0.5  # gate=fixed: the mixture's weight on the local expert
    c.fedms.gate_rank = 4  # gate adapter bottleneck d -> r -> d
    # global_feature: the global expert's pooled feature | mean | cls of the branch point
    c.fedms.gate_input = "global_feature"
    c.fedms.gate_holdout = 0.2  # examples held out of the experts in a round, for the gate only
    c.fedms.rotate_holdout = True  # the held-out slice moves every round the client trains
    c.fedms.mixing = "probs"  # probs (mix softmaxes) | logits | residual
    c.fedms.aux_weight = 0.0  # gate_holdout=0: + aux_weight * each expert's own cross-entropy
    c.fedms.train_global = True  # keep training the global expert (FedAvg) in stage 2
    c.fedms.prior = "balanced"  # balanced softmax + each client's own log label prior | none
    c.fedms.prior_smoothing = 1.0  # add-s smoothing of the client's label counts
    c.fedms.local_start = "stage1"  # stage1: the local expert trains from round 0 (Ditto) | stage2
    c.fedms.local_loss = "own"  # stage 2: own cross-entropy | mixture (APFL, gate + global fixed)
    c.fedms.local_prox = 0.0  # (local_prox / 2) ||local - global||^2
    c.fedms.local_expert = "own"  # own copy | offset from the received global expert
    c.fedms.gate_lr_factor = 1.0  # the gate's learning rate as a multiple of client.lr

    c.fedprox = ml_collections.ConfigDict()
    c.fedprox.mu = 0.01
    c.fedrep = ml_collections.ConfigDict()
    c.fedrep.head_fraction = 0.5  # share of a round's local steps on the head (then the body)
    c.ditto = ml_collections.ConfigDict()
    c.ditto.lam = 0.1  # personal model's pull (lam / 2) ||v - w_global||^2

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | synthetic | idx | folder | a TFDS name
    c.data.data_dir = ""  # idx: the IDX files; folder: root/{train,test}/<class>/; TFDS: its data_dir
    c.data.num_clients = 20
    c.data.partition = "dirichlet"  # dirichlet | shards | iid
    c.data.alpha = 0.3
    c.data.min_examples = 16
    c.data.shards_per_client = 2
    c.data.image_size = 0  # data.name=folder: resize every image to this size (0: keep; all must match)
    c.data.train_examples = 0  # a stratified, seeded subset of the training split (0: all of it)
    c.data.test_examples = 0  # likewise for the test split (personalised and global evaluation)
    # model.frozen_blocks > 0: a directory keeping the frozen stem's tokens of the train and test
    # images, keyed by a hash of images, backbone and preprocessing ("": compute them every run)
    c.data.feature_cache = ""
    c.data.validation = 0.0  # > 0: tuning; this fraction of each client's training data replaces the test split

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # hub id or local directory; "" = random ViT of the shape below
    c.model.image_size = 16
    c.model.patch_size = 4
    c.model.hidden = 64
    c.model.layers = 4
    c.model.heads = 4
    c.model.mlp_dim = 128
    c.model.hidden_act = "gelu"
    c.model.dtype = "float32"
    c.model.head = "linear"  # linear | zero_shot (CLIP: class-prompt text embeddings)
    c.model.tune_head = False  # zero_shot only: train the text classifier too (linear always is)
    c.model.prompt = "a photo of a {}."  # zero_shot: the class prompt template
    # F: blocks [0, F) frozen for every method and run once per image before training; the
    # federated model (SAL levels, LoRA) is blocks [F, L)
    c.model.frozen_blocks = 0
    c.model.scan_layers = True  # blocks run as a lax.scan over stacked params (False: unrolled)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = ("q", "k", "v", "o", "fc1", "fc2")

    c.sal = ml_collections.ConfigDict()
    c.sal.mode = "progressive"
    c.sal.k0 = 1
    c.sal.step = 1
    c.sal.every = 3
    # Budget-aware SAL (fedms_jax/budgets.py): blocks per compute tier, e.g. (1, 2, 4) (empty: no
    # budgets); a client of budget b trains the top min(k, b) blocks
    c.sal.budgets = ()
    c.sal.budget_shares = ()  # each tier's share of the clients, summing to 1 (empty: equal)
    c.sal.budget_mode = "static"  # static: a client's tier is fixed | dynamic: drawn anew every round

    c.client = ml_collections.ConfigDict()
    c.client.local_steps = 10
    c.client.epochs = 0  # > 0: E passes without replacement per round instead of local_steps
    c.client.batch_size = 32
    c.client.optimizer = "adamw"
    c.client.lr = 3e-3
    c.client.momentum = 0.9
    c.client.weight_decay = 0.0
    c.client.schedule = "constant"
    # Run the frozen part of the loss (SAL trunk; FedMS's frozen global expert) once per round
    # over a client's examples instead of every step, when it holds no more examples than its
    # steps process (max examples <= local_steps * batch_size). Same math, less work.
    c.client.cache_frozen = True

    c.server = ml_collections.ConfigDict()
    c.server.optimizer = "fedavg"  # fedavg (SGD, lr 1) | fedadam
    c.server.lr = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 6  # rounds between checkpoints (0: only on preemption and at the end)
    c.checkpoint.keep = 3  # newest checkpoints kept
    c.checkpoint.asynchronous = True  # orbax writes in the background

    c.mesh = ml_collections.ConfigDict()
    c.mesh.clients = 0  # devices on the 'clients' axis; 0 = all devices / mesh.model
    c.mesh.model = 1  # devices on the 'model' axis (the backbone's split)
    c.mesh.strategy = "replicated"  # replicated | fsdp | tensor (fedms_jax/federated/sharding.py)

    c.placement = ml_collections.ConfigDict()
    c.placement.backend = "vmap"  # vmap | sequential
    c.placement.chunk_size = 0  # clients per vmapped chunk; 0 = auto (fedms_jax/perf.py: cache-sized on CPU, whole cohort on GPU/TPU)

    c.compile = ml_collections.ConfigDict()
    c.compile.ahead = True  # compile every program the run needs in background threads, while rounds run
    c.compile.threads = 0  # 0 = auto (half the host's cores, 1 to 8)
    c.compile.cache = True  # persistent compilation cache: a repeated or resumed run compiles nothing
    c.compile.cache_dir = ""  # "" = $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/fedms_jax/jax

    # User-level differential privacy, DP-FedAvg (fedms_jax/privacy.py): each client's upload
    # clipped to L2 norm `clip`, N(0, (noise_multiplier * clip)^2) added to the server's sum;
    # epsilon at `delta` in every metrics line. clip = 0: off.
    c.dp = ml_collections.ConfigDict()
    c.dp.clip = 0.0
    c.dp.noise_multiplier = 0.0
    c.dp.target_epsilon = 0.0  # > 0: calibrate noise_multiplier to reach this epsilon after all rounds
    c.dp.delta = 1e-5
    c.dp.accountant = "rdp"  # rdp | pld (dp-accounting)

    c.multihost = ml_collections.ConfigDict()
    c.multihost.timeout_s = 300  # a process that died is noticed within about this long

    # Where client data and states live (fedms_jax/federated/population.py): device (all of them on
    # the devices) | streamed (data on the host, states on disk, the cohort moved each round) |
    # auto (streamed beyond 10,000 clients or a quarter of the device memory)
    c.population = ml_collections.ConfigDict()
    c.population.mode = "auto"
    c.population.buckets = 4  # streamed: padded client sizes (powers of two down from the largest)
    c.population.eval_sample = 0  # personalised evaluation over this many seeded clients; 0 = all up to 1024
    c.population.prefetch = True  # streamed: gather the next cohort while the round runs
    return c
