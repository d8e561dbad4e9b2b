"""Sparsity core: masks, layer-wise densities, drop-and-grow, resize, schedules, optimizer policy.

Everything here is a pure function of pytrees and static configuration; nothing imports the GAN
code, so the pieces work for any Flax/JAX parameter tree.
"""

from ddst_jax.sparsity.distributions import (
    erk_densities,
    erk_raw_score,
    layer_densities,
    uniform_densities,
)
from ddst_jax.sparsity.dst import (
    SCOPES,
    MaskUpdate,
    drop_and_grow,
    drop_and_grow_update,
    gradient_scores,
    magnitude_scores,
    params_after_update,
    random_scores,
    resize,
    resize_update,
)
from ddst_jax.sparsity.masks import (
    MASK_SAMPLINGS,
    apply_masks,
    count_active,
    count_for_density,
    default_is_maskable,
    dense_masks,
    density,
    init_masks,
    layer_counts,
    maskable_except,
    maskable_leaves,
    maskable_tree,
    num_maskable,
    path_str,
)
from ddst_jax.sparsity.optim import (
    POLICIES,
    gradients_for_optimizer,
    masked_apply_updates,
    optimizer_state_after_regrowth,
    sparse_update,
    zero_state_at,
)
from ddst_jax.sparsity.schedules import cosine_drop_fraction, is_update_step
from ddst_jax.sparsity.topk import rank_descending, select_top

__all__ = [
    "MASK_SAMPLINGS",
    "POLICIES",
    "SCOPES",
    "MaskUpdate",
    "apply_masks",
    "cosine_drop_fraction",
    "count_active",
    "count_for_density",
    "default_is_maskable",
    "dense_masks",
    "density",
    "drop_and_grow",
    "drop_and_grow_update",
    "erk_densities",
    "erk_raw_score",
    "gradient_scores",
    "gradients_for_optimizer",
    "init_masks",
    "is_update_step",
    "layer_counts",
    "layer_densities",
    "magnitude_scores",
    "masked_apply_updates",
    "maskable_except",
    "maskable_leaves",
    "maskable_tree",
    "num_maskable",
    "optimizer_state_after_regrowth",
    "params_after_update",
    "path_str",
    "random_scores",
    "rank_descending",
    "resize",
    "resize_update",
    "select_top",
    "sparse_update",
    "uniform_densities",
    "zero_state_at",
]
