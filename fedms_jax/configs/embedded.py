"""The offline default: FedAvg + SAL on scikit-learn's digits over 20 non-IID clients
(Dirichlet alpha 0.3), with a small randomly initialised ViT and LoRA.

No pretrained weights can be fetched offline, so the frozen backbone is a random ViT; set
``model.pretrained`` to a hub id or a local checkpoint directory to use real weights.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.algorithm = "fedavg"
    c.rounds = 24
    c.cohort_size = 8
    c.eval_every = 1

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.data_dir = ""
    c.data.num_clients = 20
    c.data.partition = "dirichlet"  # dirichlet | shards | iid
    c.data.alpha = 0.3
    c.data.min_examples = 16
    c.data.shards_per_client = 2

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
    c.model.head = "linear"

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

    c.client = ml_collections.ConfigDict()
    c.client.local_steps = 10
    c.client.batch_size = 32
    c.client.optimizer = "adamw"
    c.client.lr = 3e-3
    c.client.momentum = 0.9
    c.client.weight_decay = 0.0
    c.client.schedule = "constant"

    c.server = ml_collections.ConfigDict()
    c.server.optimizer = "fedavg"  # fedavg (SGD, lr 1) | fedadam
    c.server.lr = 1.0

    c.placement = ml_collections.ConfigDict()
    c.placement.backend = "vmap"  # vmap | sequential
    c.placement.chunk_size = 0  # clients per vmapped chunk; 0 = the whole cohort at once
    return c
