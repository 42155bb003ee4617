"""The managed-ConfigMap views the informer keeps (adapters/kube.py): FrozenStrMap must
behave as the dict it replaces, only smaller."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolbudget.adapters.kube import FrozenStrMap, configmap_view

strings = st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=12)


@given(strings, strings)
def test_a_frozen_map_is_equal_to_its_dict_and_to_maps_of_the_same_items(
    a: dict[str, str], b: dict[str, str]
) -> None:
    frozen_a, frozen_b = FrozenStrMap(a), FrozenStrMap(b)
    assert frozen_a == a
    assert dict(frozen_a) == a
    assert len(frozen_a) == len(a)
    assert (frozen_a == frozen_b) == (a == b)
    assert (frozen_a == b) == (a == b)
    if a == b:
        assert hash(frozen_a) == hash(frozen_b)
    for key in a:
        assert frozen_a[key] == a[key]
        assert frozen_a.get(key) == a[key]


def test_a_missing_key_raises_key_error_and_get_answers_the_default() -> None:
    frozen = FrozenStrMap({"DB_POOL_SIZE": "4"})
    with pytest.raises(KeyError):
        frozen["DB_MAX_OVERFLOW"]
    assert frozen.get("DB_MAX_OVERFLOW", "none") == "none"
    assert FrozenStrMap() == {}
    assert FrozenStrMap(None) == FrozenStrMap({})


def test_maps_with_the_same_keys_share_one_index_and_intern_their_values() -> None:
    # What makes a view small: one key index for all views, values that are shared strings.
    first = FrozenStrMap({"DB_POOL_SIZE": "4", "DB_MAX_OVERFLOW": "2"})
    second = FrozenStrMap({"DB_MAX_OVERFLOW": "".join(["2"]), "DB_POOL_SIZE": "8"})
    assert first._index is second._index
    assert first["DB_MAX_OVERFLOW"] is second["DB_MAX_OVERFLOW"]
    assert sys.getsizeof(first) + sys.getsizeof(first._values) < sys.getsizeof(dict(first))


def test_views_of_the_same_configmap_compare_equal_and_a_changed_value_differs() -> None:
    # The informer reports a change only when a view differs from the one it holds.
    body = {
        "metadata": {"labels": {"app.kubernetes.io/managed-by": "poolbudget-operator"},
                     "annotations": {"a": "1"}},
        "data": {"DB_POOL_SIZE": "4", "DB_MAX_OVERFLOW": "2"},
    }  # fmt: skip
    assert configmap_view(body) == configmap_view(body)
    changed = {**body, "data": {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "2"}}
    assert configmap_view(body) != configmap_view(changed)
    assert configmap_view({"metadata": {}}).data == {}
