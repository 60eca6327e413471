"""The model registry: names, construction, and its errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mtjax import models
from mtjax.models import _registry

MINE = {
  "shared_bottom": models.SharedBottom,
  "omoe": models.OMoE,
  "mmoe": models.MMoE,
  "cgc": models.CGC,
  "ple": models.PLE,
  "stem": models.STEM,
}


def test_available_lists_registered_models_sorted():
  names = models.available()
  assert names == sorted(names)
  assert set(MINE) <= set(names)


@pytest.mark.parametrize("name", sorted(MINE))
def test_get_builds_the_registered_class_with_config(name):
  model = models.get(name, num_tasks=3, tower=(4, 1))
  assert type(model) is MINE[name]
  assert model.num_tasks == 3 and tuple(model.tower) == (4, 1)


def test_get_model_runs():
  model = models.get("mmoe", num_tasks=2, num_experts=2, expert=(4,), tower=(3, 1))
  x = jnp.ones((5, 3))
  out, aux = model.apply(model.init(jax.random.key(0), x), x)
  assert out.shape == (2, 5) and aux["gates"].shape == (2, 5, 2)


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="mtjax: unknown model 'mmeo'") as err:
    models.get("mmeo", num_tasks=2)
  for name in MINE:
    assert name in str(err.value)


def test_unknown_config_key_lists_options():
  with pytest.raises(ValueError, match=r"mtjax: model 'mmoe' has no option\(s\) \['experts', 'num_expert'\]") as err:
    models.get("mmoe", num_tasks=2, num_expert=4, experts=(8,))
  msg = str(err.value)
  assert "num_experts" in msg and "gate_dropout" in msg and "parent" not in msg
  with pytest.raises(ValueError, match="has no option"):
    models.get("mmoe", num_tasks=2, parent=None)  # flax internals are not options
  with pytest.raises(ValueError, match="has no option"):
    models.get("ple", num_tasks=2, num_experts=3)  # an MMoE option is not a PLE option


def test_missing_required_field():
  with pytest.raises(ValueError, match=r"mtjax: model 'ple' needs option\(s\) \['num_tasks'\]"):
    models.get("ple", num_levels=2)


def test_register_new_model_and_conflicts():
  name = "test_registry_tiny_linear"

  class TinyLinear(nn.Module):
    num_tasks: int = 2

    @nn.compact
    def __call__(self, x, *, train=False):
      return nn.Dense(self.num_tasks)(x).T, {}

  class Other(TinyLinear):
    pass

  try:
    assert models.register(name)(TinyLinear) is TinyLinear
    assert name in models.available()
    assert type(models.get(name)) is TinyLinear and models.get(name, num_tasks=4).num_tasks == 4
    models.register(name)(TinyLinear)  # re-registering the same class (e.g. a module reload) is fine
    with pytest.raises(ValueError, match="already registered"):
      models.register(name)(Other)
    with pytest.raises(ValueError, match="mtjax: model 'test_registry_tiny_linear' has no option"):
      models.get(name, width=3)
  finally:
    _registry._MODELS.pop(name, None)
  assert name not in models.available()
  with pytest.raises(ValueError, match="non-empty string"):
    models.register("")
