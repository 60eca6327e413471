"""Feature specs and the embedding layer that turns a batch of ids/floats into one input vector."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Categorical:
  """A categorical field: integer ids in ``[0, vocab_size)``.

  Id ``vocab_size`` (one past the end) is reserved for unknown / out-of-range ids (see
  :class:`FeatureEmbedding`), so the table has ``vocab_size + 1`` rows.
  """

  name: str
  vocab_size: int
  embed_dim: int = 8

  def __post_init__(self):
    if self.vocab_size < 1 or self.embed_dim < 1:
      raise ValueError(f"mtjax: categorical feature {self.name!r}: vocab_size and embed_dim must be >= 1.")


@dataclasses.dataclass(frozen=True)
class Dense:
  """A dense (float) field of ``dim`` values per sample."""

  name: str
  dim: int = 1


@dataclasses.dataclass(frozen=True)
class IdSequence:
  """A variable-length sequence of categorical ids per sample (a behaviour history): ``[B, L]`` ints.

  Sequences are left-aligned and padded at the end with negative ids (``-1``); any negative id is
  padding, ``L`` may differ between batches (up to ``max_len``, checked). Ids at or past
  ``vocab_size`` are unknown, handled as the spec's ``oov`` says (the reserved row, or an error).
  ``table`` names a :class:`Categorical` field whose embedding table the sequence shares (an item
  history in the item table: same ``vocab_size`` and ``embed_dim``). :class:`FeatureEmbedding` puts
  the ``pooling`` (``"mean"`` or ``"sum"`` over the valid steps; ``0`` for an empty sequence) into
  the model input, so every model takes sequence fields, and exposes the whole sequence
  ``[B, L, d]`` and its ``[B, L]`` mask to models that read it step by step (:class:`DUPN`).
  """

  name: str
  vocab_size: int
  embed_dim: int = 8
  max_len: int = 50
  pooling: str = "mean"
  table: Optional[str] = None

  def __post_init__(self):
    if self.vocab_size < 1 or self.embed_dim < 1 or self.max_len < 1:
      raise ValueError(f"mtjax: sequence feature {self.name!r}: vocab_size, embed_dim and max_len must be >= 1.")
    if self.pooling not in ("mean", "sum"):
      raise ValueError(f"mtjax: sequence feature {self.name!r}: pooling must be 'mean' or 'sum', got {self.pooling!r}.")


def sequence_key(name: str) -> str:
  """The key of a sequence field's ``[B, L, d]`` embeddings in :class:`FeatureEmbedding`'s fields."""
  return f"{name}:sequence"


def mask_key(name: str) -> str:
  """The key of a sequence field's ``[B, L]`` validity mask (float, 1 for a real step) in the fields."""
  return f"{name}:mask"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """The input schema of a model: categorical and dense fields.

  A batch of features is a mapping ``name -> array``: ``[B]`` ints for a categorical field,
  ``[B]`` or ``[B, dim]`` floats for a dense one. Extra keys (labels, domain ids) are ignored.

  ``oov`` says what happens to a categorical id outside ``[0, vocab_size)`` (unseen at
  vocabulary-building time, or a corrupt id): ``"reserved"`` (default) maps it to the table's
  reserved last row, one shared learned "unknown" embedding -- the usual choice of production
  ranking systems, where new ids arrive all the time; ``"error"`` raises a ``ValueError`` naming
  the field (eagerly, or from inside ``jit`` through mtjax's runtime checks) -- for data that
  should be clean. Every model that takes this spec honours it.

  Example:
    >>> import mtjax
    >>> spec = mtjax.models.FeatureSpec(
    ...     categorical=(mtjax.models.Categorical('user', 100, 8),), dense=(mtjax.models.Dense('age'),))
    >>> spec.output_dim
    9
  """

  categorical: Sequence[Categorical] = ()
  dense: Sequence[Dense] = ()
  oov: str = "reserved"
  sequences: Sequence[IdSequence] = ()

  def __post_init__(self):
    if self.oov not in ("reserved", "error"):
      raise ValueError(f"mtjax: FeatureSpec.oov must be 'reserved' or 'error', got {self.oov!r}.")
    object.__setattr__(self, "categorical", tuple(self.categorical))
    object.__setattr__(self, "dense", tuple(self.dense))
    object.__setattr__(self, "sequences", tuple(self.sequences))
    names = [f.name for f in self.categorical] + [f.name for f in self.dense] + [f.name for f in self.sequences]
    if len(set(names)) != len(names):
      raise ValueError(f"mtjax: FeatureSpec has duplicate field names: {names}.")
    if not names:
      raise ValueError("mtjax: FeatureSpec needs at least one field.")
    cats = {f.name: f for f in self.categorical}
    for f in self.sequences:
      if f.table is None:
        continue
      base = cats.get(f.table)
      if base is None or (base.vocab_size, base.embed_dim) != (f.vocab_size, f.embed_dim):
        raise ValueError(
          f"mtjax: sequence feature {f.name!r} shares table {f.table!r}, which must be a categorical field of "
          f"the spec with the same vocab_size and embed_dim ({f.vocab_size}, {f.embed_dim})."
        )

  @property
  def output_dim(self) -> int:
    return (
      sum(f.embed_dim for f in self.categorical)
      + sum(f.dim for f in self.dense)
      + sum(f.embed_dim for f in self.sequences)
    )

  @property
  def names(self) -> tuple[str, ...]:
    return (
      tuple(f.name for f in self.categorical)
      + tuple(f.name for f in self.dense)
      + tuple(f.name for f in self.sequences)
    )


class Embed(nn.Module):
  """An embedding table looked up through :func:`mtjax.embedding_lookup`: a drop-in for ``flax.linen.Embed``.

  Its parameter is ``embedding`` ``[num_embeddings, features]`` (the same name as ``nn.Embed``'s);
  because the lookup is marked, :func:`mtjax.task_grads` keeps the table's per-task gradients as
  the looked-up rows (exact, never ``[T, V, d]``). Use it in your own models in place of
  ``nn.Embed``.

  Example:
    >>> import jax, jax.numpy as jnp, mtjax
    >>> emb = mtjax.models.Embed(100, 4)
    >>> variables = emb.init(jax.random.key(0), jnp.array([1, 2]))
    >>> emb.apply(variables, jnp.array([1, 2, 1])).shape
    (3, 4)

  Attributes:
    num_embeddings: rows ``V``.
    features: row width ``d``.
    embedding_init: initializer of the table.
    mode: ids outside ``[0, V)``: ``"fill"`` (zeros, no gradient) or ``"clip"``.
  """

  num_embeddings: int
  features: int
  embedding_init: Any = nn.initializers.normal(stddev=0.05)
  mode: str = "fill"

  @nn.compact
  def __call__(self, ids):
    from mtjax._src.sparse import embedding_lookup  # pylint: disable=import-outside-toplevel

    table = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features))
    return embedding_lookup(table, ids, mode=self.mode)


def _dense_value(batch: Mapping[str, Any], f: Dense) -> jax.Array:
  v = jnp.asarray(batch[f.name], jnp.float32)
  if v.ndim == 1:
    v = v[:, None]
  if v.shape[-1] != f.dim:
    raise ValueError(f"mtjax: dense feature {f.name!r} has width {v.shape[-1]}, spec says {f.dim}.")
  return v


class FeatureEmbedding(nn.Module):
  """Embeds every categorical field and concatenates them with the dense fields.

  Attributes:
    spec: the :class:`FeatureSpec`.
    width_multiplier: each categorical embedding is ``embed_dim * width_multiplier`` wide
      (STEM-Net uses ``T + 1`` to split one table into task-specific and shared parts).
    oov: overrides ``spec.oov`` when set: ``"reserved"`` maps ids outside ``[0, vocab_size)`` to
      the reserved last row; ``"error"`` raises (eagerly, or through a jit-safe check) instead.

  Returns ``(x, field_embeddings)``: the ``[B, D]`` concatenation and a dict of per-field
  ``[B, embed_dim * width_multiplier]`` embeddings (models such as STEM-Net and PEPNet need the parts).
  """

  spec: FeatureSpec
  width_multiplier: int = 1
  oov: Optional[str] = None

  @nn.compact
  def __call__(self, batch: Mapping[str, Any]):
    oov = self.spec.oov if self.oov is None else self.oov
    if oov not in ("reserved", "error"):
      raise ValueError(f"mtjax: FeatureEmbedding.oov must be 'reserved' or 'error', got {oov!r}.")
    missing = [n for n in self.spec.names if n not in batch]
    if missing:
      raise ValueError(f"mtjax: the batch lacks feature(s) {missing}; it has {sorted(batch)}.")
    parts, fields, tables = [], {}, {}
    for f in self.spec.categorical:
      ids = jnp.asarray(batch[f.name])
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"mtjax: categorical feature {f.name!r} must hold integer ids, got {ids.dtype}.")
      bad = (ids < 0) | (ids >= f.vocab_size)
      if oov == "error":
        from mtjax._src import numerics  # local import keeps models importable standalone

        ids = numerics.enforce(
          ids, numerics.condition_check(jnp.any(bad), f"mtjax: feature {f.name!r} has ids outside [0, {f.vocab_size}).")
        )
      ids = jnp.where(bad, f.vocab_size, ids)
      table = Embed(f.vocab_size + 1, f.embed_dim * self.width_multiplier, name=f"embed_{f.name}")
      tables[f.name] = table
      e = table(ids)
      fields[f.name] = e
      parts.append(e)
    for f in self.spec.dense:
      v = _dense_value(batch, f)
      fields[f.name] = v
      parts.append(v)
    for f in self.spec.sequences:
      ids = jnp.asarray(batch[f.name])
      if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 2:
        raise ValueError(
          f"mtjax: sequence feature {f.name!r} must hold [B, L] integer ids (negative = padding), got "
          f"{ids.dtype}{list(ids.shape)}."
        )
      if ids.shape[1] > f.max_len:
        raise ValueError(f"mtjax: sequence feature {f.name!r} has length {ids.shape[1]} > max_len {f.max_len}.")
      valid = ids >= 0
      unknown = valid & (ids >= f.vocab_size)
      if oov == "error":
        from mtjax._src import numerics  # local import keeps models importable standalone

        ids = numerics.enforce(
          ids,
          numerics.condition_check(jnp.any(unknown), f"mtjax: feature {f.name!r} has ids >= {f.vocab_size}."),
        )
      # padding looks up past the table: zeros, no gradient (embedding_lookup's "fill"); unknown: the reserved row
      ids = jnp.where(valid, jnp.where(unknown, f.vocab_size, ids), f.vocab_size + 1)
      if f.table is not None:
        table = tables[f.table]
      else:
        table = Embed(f.vocab_size + 1, f.embed_dim * self.width_multiplier, name=f"embed_{f.name}")
      e = table(ids)  # [B, L, d]
      m = valid.astype(e.dtype)
      pooled = jnp.sum(e, axis=1)
      if f.pooling == "mean":
        pooled = pooled / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
      fields[f.name] = pooled
      fields[sequence_key(f.name)] = e
      fields[mask_key(f.name)] = m
      parts.append(pooled)
    return jnp.concatenate(parts, axis=-1), fields


def spec_from_arrays(
  categorical: Mapping[str, np.ndarray], dense: Sequence[str] = (), embed_dim: int = 8
) -> FeatureSpec:
  """A spec whose vocabulary sizes are ``max id + 1`` of the given id arrays."""
  cats = tuple(Categorical(k, int(np.max(v)) + 1, embed_dim) for k, v in categorical.items())
  return FeatureSpec(categorical=cats, dense=tuple(Dense(d) for d in dense))
