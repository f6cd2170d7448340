"""Device mesh and the logical-axis vocabulary that maps model dimensions onto it.

Every parameter and main activation carries logical names from `LOGICAL_AXES`; a rules tuple maps
each name to mesh axes of the fixed mesh `('data', 'fsdp', 'model')`. Changing the parallelism
(data parallel, FSDP, tensor parallel) is a rules change only; the model code never names mesh
axes. Every rules tuple lists every logical name, because NNX applies rules as a plain rename.
"""

from collections.abc import Mapping, Sequence
import math

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "feature")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def _rules(**mapped: str | tuple[str, ...]) -> Rules:
    """A rules tuple listing every logical axis: `mapped` ones sharded, the rest replicated."""
    unknown = set(mapped) - set(LOGICAL_AXES)
    assert not unknown, unknown
    return tuple((name, mapped.get(name)) for name in LOGICAL_AXES)


_BATCH = ("data", "fsdp")
DATA_PARALLEL = _rules(batch=_BATCH)
FSDP = _rules(batch=_BATCH, embed="fsdp")
TENSOR_PARALLEL = _rules(batch=_BATCH, heads="model", mlp="model", vocab="model")
FSDP_TENSOR_PARALLEL = _rules(batch=_BATCH, embed="fsdp", heads="model", mlp="model", vocab="model")
RULES = {"dp": DATA_PARALLEL, "fsdp": FSDP, "tp": TENSOR_PARALLEL, "fsdp_tp": FSDP_TENSOR_PARALLEL}


def rules(name: str) -> Rules:
    """The named rules preset (`dp`, `fsdp`, `tp`, `fsdp_tp`)."""
    if name not in RULES:
        raise ValueError(f"Unknown sharding rules {name!r}; choose one of {sorted(RULES)}.")
    return RULES[name]


def make_mesh(
    shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `('data', 'fsdp', 'model')` mesh with Auto axes; one size may be -1 (all the rest).

    `shape` is a dict (missing axes get size 1) or a sequence of three sizes.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}.")
        sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"Mesh shape {tuple(sizes)} must give one size per axis {MESH_AXES}.")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh shape {tuple(sizes)}: sizes must be positive, with at most one -1.")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise ValueError(
            f"Mesh shape {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} devices; "
            "choose axis sizes whose product divides the device count."
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh shape {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of the "
            f"{len(devices)} devices; make the sizes multiply to {len(devices)} or use -1."
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
    """The PartitionSpec for logical `names` under `rules`.

    A mesh axis is used at most once: a later dimension whose axes are already taken stays
    replicated (e.g. activations `('batch', 'length', 'embed')` under FSDP shard the batch only).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in table:
            raise ValueError(f"Logical axis {name!r} is not in the sharding rules {sorted(table)}.")
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without mesh and rules.

    The rules come from the enclosing `nnx.logical_axis_rules(...)`, the mesh from `jax.set_mesh`.
    """
    active_rules = flax_spmd.get_logical_axis_rules()
    if not active_rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, active_rules))


def state_shardings(state, mesh: Mesh, rules: Rules):
    """NamedShardings for an NNX state (or abstract state), from each Variable's logical names.

    Variables without `out_sharding` metadata (e.g. RNG counters, optimizer step) are replicated.
    The result mirrors `state` and can be passed as `jax.jit` in/out shardings.
    """

    def one(variable):
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, P())
        names = variable.get_metadata().get("out_sharding") or ()
        return variable.replace(NamedSharding(mesh, logical_to_spec(names, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every batch array: leading dimension over the `batch` mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))
