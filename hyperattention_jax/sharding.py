"""HyperAttention on a device mesh: batch, head and sequence (context) parallelism.

``sharded_hyper_attention`` runs the computation under ``jax.shard_map``, each device on
its own part of the problem, and returns exactly what ``hyper_attention`` returns for the
same ``rng`` (up to rounding):

* **Batch** (data) parallelism splits the batch rows. The random draws depend on the key
  and the head only, so nothing else changes.
* **Head** parallelism splits the heads. A device holding heads ``h0..h0+k-1`` tells the
  local computation its global key/value head offset, so head ``h`` still draws its
  samples from ``fold_in(rng, h)``; the hyperplanes are shared by every head.
* **Sequence** (context) parallelism takes inputs split along the sequence and swaps the
  split to the heads with one all-to-all (DeepSpeed-Ulysses style): every device then
  holds the whole sequence for ``num_heads / (head_devices * seq_devices)`` heads. This
  suits HyperAttention, whose LSH sort is global over the sequence: a sequence-local
  sort would change the result. A second all-to-all brings the output back to the
  sequence split. Each device sends and receives a fraction ``1 - 1/seq_devices`` of its
  own shards of q, k, v and the output, once each way; the rest of the work is local.

Limits (checked before tracing; a ``ValueError`` names the offending size):

* ``num_heads`` must be divisible by ``head_devices * seq_devices``: a device computes
  whole heads, and the sequence split becomes a head split.
* With grouped-query attention each device's query heads must cover whole key/value
  heads (``num_kv_heads % (head_devices * seq_devices) == 0``) or lie inside one key/value
  head (``(head_devices * seq_devices) % num_kv_heads == 0``, e.g. multi-query attention);
  in the second case that key/value head is replicated to the devices that read it, as in
  tensor-parallel GQA, and its gradient is summed back.
* The batch must be divisible by ``batch_devices``; query and key lengths by
  ``seq_devices``. ``head_dim`` is never split.

Mesh axes that no role names hold replicas: the computation is repeated on them.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from hyperattention_jax import api
from hyperattention_jax import validation
from hyperattention_jax.config import HyperAttentionConfig

_ROLES = ("batch_axis", "head_axis", "seq_axis")


def _axis_names(role: str, axis, mesh) -> tuple[str, ...]:
  """A role's mesh axes as a tuple: None -> (), "x" -> ("x",), ("x", "y") kept."""
  if axis is None:
    return ()
  names = (axis,) if isinstance(axis, str) else axis
  if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{role}={axis!r} must be None, a mesh axis name or a tuple of names.")
  for name in names:
    if name not in mesh.axis_names:
      raise ValueError(f"{role}={axis!r}: mesh has no axis {name!r}; its axes are "
                       f"{mesh.axis_names}.")
  return names


def _spec_entry(names: tuple[str, ...]):
  """The PartitionSpec entry of one array axis split over ``names`` (major first)."""
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def activation_spec(*, batch_axis=None, seq_axis=None, head_axis=None) -> PartitionSpec:
  """PartitionSpec of a ``[batch, seq, heads, head_dim]`` array split by role.

  Use it to place inputs (``jax.device_put(x, NamedSharding(mesh, spec))``) where
  ``sharded_hyper_attention`` reads them, so no data moves before the computation.

  Args:
    batch_axis, seq_axis, head_axis: a mesh axis name, a tuple of names, or None.

  Returns:
    ``PartitionSpec(batch_axis, seq_axis, head_axis, None)``.
  """
  def entry(axis):
    return _spec_entry((axis,) if isinstance(axis, str) else tuple(axis or ()))
  return PartitionSpec(entry(batch_axis), entry(seq_axis), entry(head_axis), None)


class _Layout(NamedTuple):
  """How one call is split; static (hashable), decided before tracing.

  Attributes:
    batch_axes, head_axes, seq_axes: mesh axes of each role.
    head_devices, seq_devices: the number of parts along those roles.
    num_heads, num_kv_heads: global head counts.
    kv_heads_split: whether key/value heads are split over ``head_axes`` like the
      query heads (else every head device holds all of them).
    select_kv_head: whether each device picks the one key/value head its query heads
      read (``head_devices * seq_devices > num_kv_heads``).
  """

  batch_axes: tuple[str, ...]
  head_axes: tuple[str, ...]
  seq_axes: tuple[str, ...]
  head_devices: int
  seq_devices: int
  num_heads: int
  num_kv_heads: int
  kv_heads_split: bool
  select_kv_head: bool

  @property
  def local_heads(self) -> int:
    """Query heads per device during the local computation."""
    return self.num_heads // (self.head_devices * self.seq_devices)

  @property
  def groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def specs(self):
    """PartitionSpecs of query, key/value, output and lse."""
    b, s, h = (_spec_entry(x) for x in (self.batch_axes, self.seq_axes, self.head_axes))
    kv_h = h if self.kv_heads_split else None
    return (PartitionSpec(b, s, h, None), PartitionSpec(b, s, kv_h, None),
            PartitionSpec(b, s, h, None), PartitionSpec(b, h, s))


def _plan_layout(mesh, query_shape, key_shape, *, batch_axis, head_axis, seq_axis) -> _Layout:
  """Checks the split against the mesh and the shapes; raises ValueError outside the limits."""
  roles = {role: _axis_names(role, axis, mesh)
           for role, axis in zip(_ROLES, (batch_axis, head_axis, seq_axis))}
  used = [name for names in roles.values() for name in names]
  if len(set(used)) != len(used):
    raise ValueError(f"a mesh axis may serve one role once; got batch_axis={batch_axis!r}, "
                     f"head_axis={head_axis!r}, seq_axis={seq_axis!r}.")
  size = {role: math.prod(mesh.shape[n] for n in names) for role, names in roles.items()}
  batch, q_len, num_heads, _ = query_shape
  kv_len, num_kv_heads = key_shape[1], key_shape[2]
  head_parts = size["head_axis"] * size["seq_axis"]

  if batch % size["batch_axis"]:
    raise ValueError(f"batch={batch} must be divisible by the {size['batch_axis']} devices "
                     f"of batch_axis={batch_axis!r}.")
  for name, length in (("q_len", q_len), ("kv_len", kv_len)):
    if length % size["seq_axis"]:
      raise ValueError(f"{name}={length} must be divisible by the {size['seq_axis']} devices "
                       f"of seq_axis={seq_axis!r}.")
  if num_heads % head_parts:
    raise ValueError(
        f"num_heads={num_heads} must be divisible by head_devices * seq_devices = "
        f"{size['head_axis']} * {size['seq_axis']} = {head_parts}: each device computes "
        "whole heads (sequence parallelism trades the sequence split for a head split).")
  if num_kv_heads % head_parts and head_parts % num_kv_heads:
    raise ValueError(
        f"num_kv_heads={num_kv_heads} and head_devices * seq_devices = {head_parts} must "
        "divide one another: each device's query heads must cover whole key/value heads "
        "or lie inside one.")
  return _Layout(batch_axes=roles["batch_axis"], head_axes=roles["head_axis"],
                 seq_axes=roles["seq_axis"], head_devices=size["head_axis"],
                 seq_devices=size["seq_axis"], num_heads=num_heads, num_kv_heads=num_kv_heads,
                 kv_heads_split=num_kv_heads % size["head_axis"] == 0,
                 select_kv_head=num_kv_heads < head_parts)


def _linear_axis_index(mesh, names: tuple[str, ...]):
  """This device's index along ``names`` taken together, the first name most significant
  (the order in which a PartitionSpec entry ``(a, b)`` splits an axis)."""
  index = jnp.int32(0)
  for name in names:
    index = index * mesh.shape[name] + jax.lax.axis_index(name)
  return index


def _local_attention(query, key, value, rng, scale, projections, key_value_seq_lengths, *,
                     mesh, layout: _Layout, is_causal, config, implementation, return_lse):
  """The per-device body under shard_map: local shards in, local shards out.

  Shapes on entry: ``query [B/Db, nq/Ds, N/Dh, d]``, ``key``/``value``
  ``[B/Db, nk/Ds, K', d]`` with ``K' = K/Dh`` when the key/value heads are split, else
  ``K``. Returns ``out [B/Db, nq/Ds, N/Dh, dv]`` (and ``lse [B/Db, N/Dh, nq/Ds]``).
  """
  head_index = _linear_axis_index(mesh, layout.head_axes)
  # After the all-to-all, the device at (head index i, sequence index j) holds query-head
  # block i * Ds + j of the N / (Dh * Ds) heads: tiled all_to_all hands chunk j of the
  # local heads to sequence device j.
  head_block = head_index * layout.seq_devices + _linear_axis_index(mesh, layout.seq_axes)
  kv_head_offset = head_block * layout.local_heads // layout.groups

  if layout.select_kv_head:
    # Each destination device j of the all-to-all reads one key/value head; lay the heads
    # out so that chunk j of the head axis is that head (repeated where several read it).
    local_kv_heads = key.shape[2]
    base = head_index * local_kv_heads if layout.kv_heads_split else 0
    blocks = head_index * layout.seq_devices + jnp.arange(layout.seq_devices, dtype=jnp.int32)
    wanted = blocks * layout.local_heads // layout.groups - base
    key, value = (jnp.take(x, wanted, axis=2) for x in (key, value))

  if layout.seq_axes:
    query, key, value = (jax.lax.all_to_all(x, layout.seq_axes, split_axis=2, concat_axis=1,
                                            tiled=True) for x in (query, key, value))
  # pylint: disable-next=protected-access
  out, lse = api._hyper_attention(query, key, value, rng, scale, projections,
                                  key_value_seq_lengths, kv_head_offset, is_causal=is_causal,
                                  config=config, implementation=implementation,
                                  return_lse=True)
  if layout.seq_axes:
    out = jax.lax.all_to_all(out, layout.seq_axes, split_axis=1, concat_axis=2, tiled=True)
    if return_lse:
      lse = jax.lax.all_to_all(lse, layout.seq_axes, split_axis=2, concat_axis=1, tiled=True)
  return (out, lse) if return_lse else out


def _place(x, mesh, spec: PartitionSpec):
  """Moves ``x`` to ``spec`` along the mesh's Explicit axes (shard_map insists that typed
  shardings match its in_specs); Auto axes are resharded by shard_map itself."""
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
  if x is None or not explicit:
    return x

  def keep(entry):
    names = tuple(n for n in ((entry,) if isinstance(entry, str) else entry or ())
                  if n in explicit)
    return _spec_entry(names)

  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*map(keep, spec))))


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "is_causal", "config",
                                             "implementation", "return_lse"))
def _sharded(query, key, value, rng, scale, projections, key_value_seq_lengths, *, mesh, layout,
             is_causal, config, implementation, return_lse):
  q_spec, kv_spec, out_spec, lse_spec = layout.specs()
  lengths_spec = PartitionSpec(_spec_entry(layout.batch_axes))
  replicated = PartitionSpec()
  args = (_place(query, mesh, q_spec), _place(key, mesh, kv_spec),
          _place(value, mesh, kv_spec), rng, scale, _place(projections, mesh, replicated),
          _place(key_value_seq_lengths, mesh, lengths_spec))
  body = functools.partial(_local_attention, mesh=mesh, layout=layout, is_causal=is_causal,
                           config=config, implementation=implementation, return_lse=return_lse)
  # check_vma=False: kernels declare their outputs without the varying-axes annotation that
  # the check demands of pallas_call. The body needs no replication tracking: it has no
  # reductions over devices, and shard_map sums the gradients of the replicated inputs.
  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, replicated, replicated, replicated, lengths_spec),
      out_specs=(out_spec, lse_spec) if return_lse else out_spec, check_vma=False)(*args)


def sharded_hyper_attention(query, key, value, *, mesh, batch_axis=None, head_axis=None,
                            seq_axis=None, rng=None, is_causal=False, scale=None, config=None,
                            projections=None, key_value_seq_lengths=None, implementation=None,
                            return_lse=False):
  """``hyper_attention`` split over a device mesh, with the unsharded call's result.

  Each device computes its part locally (batch rows, heads, or, with ``seq_axis``, whole
  sequences of a subset of heads after an all-to-all); no device gathers the whole
  problem. The random draws follow the global head index, so the result equals
  ``hyper_attention(query, key, value, rng=rng, ...)`` up to rounding whatever the split.
  Works eagerly and inside ``jax.jit``, on meshes with Auto or Explicit axes; inputs
  already placed as ``activation_spec(...)`` describes are not moved.

  Args:
    query: ``[batch, q_len, num_heads, head_dim]``.
    key: ``[batch, kv_len, num_kv_heads, head_dim]``, ``num_heads % num_kv_heads == 0``.
    value: ``[batch, kv_len, num_kv_heads, value_head_dim]``.
    mesh: a ``jax.sharding.Mesh``.
    batch_axis: mesh axis name(s) splitting the batch, or None.
    head_axis: mesh axis name(s) splitting the heads, or None.
    seq_axis: mesh axis name(s) splitting the sequence (inputs and outputs), or None.
      Inside, the split moves to the heads: see the module docstring for the limits.
    rng, is_causal, scale, config, projections, key_value_seq_lengths, implementation,
      return_lse: as in ``hyper_attention``.

  Returns:
    ``[batch, q_len, num_heads, value_head_dim]`` split as
    ``activation_spec(batch_axis, seq_axis, head_axis)`` (and the lse
    ``[batch, num_heads, q_len]`` split as ``P(batch_axis, head_axis, seq_axis)``).

  Raises:
    ValueError: for an axis the mesh lacks, an axis used twice, or sizes that the split
      cannot divide (naming the sizes), besides ``hyper_attention``'s own checks.

  Example:
    >>> mesh = jax.make_mesh((2, 4), ("data", "seq"))
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 16384, 8, 64))
    >>> out = sharded_hyper_attention(q, k, v, mesh=mesh, batch_axis="data",
    ...                               seq_axis="seq", is_causal=True)
    >>> out.shape
    (2, 16384, 8, 64)
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise ValueError(f"config must be a HyperAttentionConfig; got {config!r}.")
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh; got {mesh!r}.")
  scale = validation.check_inputs(query, key, value, is_causal=is_causal, scale=scale,
                                  key_value_seq_lengths=key_value_seq_lengths,
                                  window_size=config.window_size)
  # pylint: disable-next=protected-access
  rng = jax.random.key(api._DEFAULT_SEED) if rng is None else validation.check_rng(rng)
  if projections is not None:
    validation.check_projections(projections, query.shape[-1], config.num_projections)
  api._check_implementation(implementation)  # pylint: disable=protected-access
  layout = _plan_layout(mesh, query.shape, key.shape, batch_axis=batch_axis,
                        head_axis=head_axis, seq_axis=seq_axis)
  return _sharded(query, key, value, rng, scale, projections,
                  key_value_seq_lengths, mesh=mesh, layout=layout, is_causal=bool(is_causal),
                  config=config, implementation=implementation, return_lse=bool(return_lse))
