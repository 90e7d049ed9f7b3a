"""(b) The paper-scale setting: CIFAR-100 from TFDS, CLIP ViT-B/32 with its zero-shot text head,
100 clients, Dirichlet alpha 0.1 (override ``--config.data.alpha=0.5`` for the milder split),
10% participation.

Needs the checkpoint (``openai/clip-vit-base-patch32``: hub id, or a local directory with its
tokenizer files) and CIFAR-100 prepared for TFDS in ``data.data_dir``:

    python experiments/compare.py --config experiments/configs/cifar100_clip.py \
        --out experiments/results/cifar100_clip_a0.1 --config.data.data_dir=$TFDS_DATA_DIR
"""
from fedms_jax.configs.embedded import get_config as _embedded


def get_config(dataset: str = "cifar100"):
    c = _embedded()
    c.rounds = 100
    c.stage1_rounds = 50
    c.cohort_size = 10  # 10% of 100 clients
    c.eval_every = 5
    c.eval_clients = 10

    c.data.name = dataset
    c.data.num_clients = 100
    c.data.partition = "dirichlet"
    c.data.alpha = 0.1
    c.data.min_examples = 20

    c.model.pretrained = "openai/clip-vit-base-patch32"
    c.model.image_size = 224
    c.model.head = "zero_shot"
    c.model.tune_head = False
    c.model.dtype = "bfloat16"

    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("q", "v")

    c.sal.mode = "progressive"
    c.sal.k0 = 1
    c.sal.step = 1
    c.sal.every = 4  # all 12 blocks active from round 44

    c.client.local_steps = 20
    c.client.batch_size = 32
    c.client.optimizer = "adamw"
    c.client.lr = 1e-3
    c.fedms.gate_rank = 64
    return c
