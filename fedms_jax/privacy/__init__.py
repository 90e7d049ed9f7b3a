"""User-level DP-FedAvg building blocks: clipping, Gaussian noise, and privacy accounting.

**Mechanism** (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"; the same Gaussian mechanism as TFF's and pfl-research's). Every round:

  1. a cohort is drawn: a uniformly random subset of *fixed* size ``m`` drawn without replacement
     from the ``N`` users, independently of earlier rounds and of the data (with tiers, tier ``i``
     draws ``m_i`` of its ``N_i`` users, the tiers independently; a user belongs to exactly one
     tier);
  2. each sampled client's whole model update (one client = one user, so this is *user-level*
     DP) is clipped to L2 norm ``<= C`` (``clip_by_global_norm``, all leaves jointly);
  3. the server adds ``N(0, (z C)^2)`` noise to every coordinate of the SUM of the clipped updates
     (``gaussian_noise_like`` with ``stddev = z * C``; ``z`` is the *noise multiplier*) and divides
     by the public, fixed number of clients (never by the number that actually reported, which
     would leak it). Everything after the noisy sum (averaging, server optimizer) is
     post-processing.

**Neighbouring relation: replace-one user** (substitution). Two populations are neighbours when
all the data of one user differs; the population sizes ``N_i`` (and hence the cohort sizes) are
public and fixed, and the user keeps its tier. This is the relation under which fixed-size
sampling without replacement has a clean amplification analysis (add/remove-one would change
``N``). Under it a user can turn an update ``+u`` into ``-u``, so the L2 sensitivity of the sum is
``2 C``, not ``C``. Consequently epsilons here are NOT comparable with the usual DP-FedAvg numbers
(McMahan et al., TFF tutorials, pfl-research defaults), which model Poisson sampling with rate
``q = m / N`` under add/remove-one and sensitivity ``C``; a replace-one neighbour is one removal
plus one addition, and at the same ``z`` our epsilons are roughly twice as large.

**Assumptions behind the numbers.** The cohort draw is exactly as in step 1, and its randomness
(who was sampled) stays secret; the noise is drawn by the trusted server from a key the adversary
does not know; a sampled client that drops out still counts in the fixed denominator (replacing
drop-outs by other clients would break uniform sampling). The run loop (``fedms_jax.run``) is a
reproducible simulation: its cohorts and noise come from named streams of the run's seed, so
the numbers describe the mechanism as deployed with secret randomness, not a run whose seed is
known. Floating-point effects of sampling
Gaussians (Mironov 2012) are ignored, as by all the libraries named above. Epsilon is reported at
one ``delta`` fixed in advance.

**Accounting** (Google's ``dp_accounting``, 0.6.0), one round = one event below with ``q = m/N``:

  * ``'rdp'``: ``RdpAccountant(neighboring_relation=REPLACE_ONE)`` with
    ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` -- Wang, Balle &
    Kasiviswanathan 2019, Theorem 27, a proven upper bound for fixed-size sampling without
    replacement under replace-one. Why ``z / 2``: that accountant feeds the multiplier straight
    into the Gaussian RDP ``alpha / (2 sigma^2)``, i.e. reads it as ``stddev / (replace-one L2
    sensitivity) = z C / (2 C)``, although ``GaussianDpEvent``'s docstring defines it as
    ``stddev / C`` (google/differential-privacy issue #378); passing ``z`` would understate the
    RDP fourfold.
  * ``'pld'``: ``dp_accounting.pld.PLDAccountant`` does not support
    ``SampledWithoutReplacementDpEvent``, and neither nearby event it does support is a correct
    substitute: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under ``REPLACE_ONE`` models the
    pair ``(1-q) N(0) + q N(-C)`` vs ``(1-q) N(0) + q N(C)``, but with a fixed-size cohort the
    replaced user's slot is otherwise filled by another user: when every other user sends ``-C``
    and the user sends ``+C`` or ``-C``, the outputs are (shifted) ``(1-q) N(0) + q N(2C)`` vs
    ``N(0)``, whose delta is far larger (N=2, m=1, z=1, delta=1e-3: that event reports eps 2.95,
    at which this pair's delta is 0.058; ``tests/test_privacy.py``). Poisson under add/remove-one
    is a different relation. So ``SampledWithoutReplacementPLDAccountant`` below adds the missing
    support. Per round, for every ``eps >= 0`` the hockey-stick divergence of the sampled
    mechanism is at most that of the pair ``A = (1-q) N(0, s^2) + q N(1, s^2)`` vs ``B = N(0, s^2)``
    with ``s = z / 2`` (advanced joint convexity, Balle, Barthe & Gaboardi 2018; Zhu, Dong & Wang
    2022), and since the relation is symmetric the same holds with the datasets swapped; the
    round's trade-off curve is therefore bounded by the *symmetrised* envelope of (A, B) (Dong,
    Roth & Su 2022, sampling without replacement, ``C_q(f)``). We build that envelope's PLD with
    dp_accounting's pessimistic connect-the-dots discretisation (``pld_pmf``) from the exact
    hockey-stick divergences of A vs B and B vs A, and compose it. Composing A-vs-B and B-vs-A
    separately and taking the max (what ``PLDAccountant`` does for ``PoissonSampledDpEvent`` under
    add/remove) gives 5-10 % less (z=1, q=0.1, 100 rounds: 31.4 against 34.2 at delta=1e-5), and
    it is not justified here: the per-round bound holds for the symmetrised curve, not for each
    order of one pair of distributions.

Both are upper bounds for the mechanism above; PLD is the tighter (z=1, q=0.1, 100 rounds,
delta=1e-5: 34.2 against RDP's 83.9). With several tiers a user's privacy is that of its own
tier's sampling rate (the other tiers' sums do not depend on the user), so the reported epsilon
is the max over tiers. For a fixed ``z`` the round's trade-off only gets worse as ``q`` grows (by
joint convexity the ``q'``-sampled pair is a mixture of the ``q``-sampled pair and two equal
distributions when ``q' < q``, and the RDP bound increases in ``q``), so that max is the epsilon of
the tier with the largest ``m_i / N_i``, and only that tier is computed. With ``budget_mode =
'dynamic'`` (``fedms_jax.budgets``) the cohort is one uniform draw from everyone: a single group
``(num_clients, cohort_size)``.
"""
from fedms_jax.privacy.accounting import (  # noqa: F401  (no jax)
    DEFAULT_PLD_DISCRETIZATION, KINDS, Accountant, SampledWithoutReplacementPLDAccountant, calibrate_noise_multiplier,
    round_event,
)
from fedms_jax.privacy.mechanism import clip_by_global_norm, gaussian_noise_like  # noqa: F401  (jax)
