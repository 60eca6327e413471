"""Multi-task datasets: synthetic generators, loaders of public benchmark formats, batching.

Every generator and loader returns :class:`MultiTaskDataset` objects (loaders: a dict of splits);
:func:`batches` and :class:`BatchIterator` turn one into batch dicts
``{'x': features, 'labels': [T, B], 'mask': [T, B]}``. Nothing is downloaded: loaders read the
files a user already has.
"""

from mtjax.data._aliccp import ALICCP_FIELDS
from mtjax.data._aliccp import ALICCP_PROCESSED_DENSE
from mtjax.data._aliccp import aliccp
from mtjax.data._aliccp import aliccp_processed
from mtjax.data._aliexpress import aliexpress
from mtjax.data._batching import BatchIterator
from mtjax.data._batching import batches
from mtjax.data._batching import epoch_order
from mtjax.data._census import CENSUS_COLLEGE
from mtjax.data._census import CENSUS_COLUMNS
from mtjax.data._census import CENSUS_NUMERIC
from mtjax.data._census import census_income
from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._kuairand import kuairand
from mtjax.data._synthetic import conflicting_tasks
from mtjax.data._synthetic import funnel_synthetic
from mtjax.data._synthetic import mmoe_synthetic
from mtjax.data._synthetic import position_bias_synthetic

__all__ = (
  "ALICCP_FIELDS",
  "ALICCP_PROCESSED_DENSE",
  "BatchIterator",
  "CENSUS_COLLEGE",
  "CENSUS_COLUMNS",
  "CENSUS_NUMERIC",
  "MultiTaskDataset",
  "aliccp",
  "aliccp_processed",
  "aliexpress",
  "batches",
  "census_income",
  "conflicting_tasks",
  "epoch_order",
  "funnel_synthetic",
  "kuairand",
  "mmoe_synthetic",
  "position_bias_synthetic",
)
