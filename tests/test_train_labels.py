"""Label values -> class names and ids (single process; tests/test_train_fit.py covers 2 ranks)."""

import numpy as np
import pytest

from hpcllm.errors import HpcllmError
from hpcllm.train.labels import MISSING, encode_labels, ids_for
from test_train_fixtures import one_torch_thread, warm_kernel_cache  # noqa: F401 (autouse)



def test_order_is_numbers_then_strings_then_other_json():
    labels = encode_labels(["sports", 10, None, MISSING, "Arts", 2, True, [1, 2], {"b": 1, "a": 2}, 2.5, "sports"])
    assert labels.class_names == ["2", "2.5", "10", "Arts", "sports", "[1, 2]", "true", '{"a": 2, "b": 1}']
    assert labels.class_values[:5] == ["2", "2.5", "10", '"Arts"', '"sports"']
    np.testing.assert_array_equal(labels.ids, [4, 2, -1, -1, 3, 0, 6, 5, 7, 1, 4])
    assert labels.n_missing == 2 and labels.n_classes == 8


def test_order_does_not_depend_on_the_data_order():
    values = ["b", "a", 3, 1, "c"]
    assert encode_labels(values).class_names == encode_labels(values[::-1]).class_names == ["1", "3", "a", "b", "c"]


def test_a_string_and_a_number_with_one_name_is_an_error():
    with pytest.raises(HpcllmError, match="both as strings"):
        encode_labels(["3", 3])


def test_ids_for_known_and_unknown_labels():
    names = encode_labels(["x", 7]).class_names
    np.testing.assert_array_equal(ids_for(names, [7, "x"]), [0, 1])
    with pytest.raises(HpcllmError, match="not one of the classes"):
        ids_for(names, ["y"])
