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
from mtjax.data._aliexpress import aliexpress_to_store
from mtjax.data._aliexpress import write_aliexpress_csv
from mtjax.data._batching import BatchIterator
from mtjax.data._batching import batches
from mtjax.data._batching import epoch_order
from mtjax.data._census import CENSUS_COLLEGE
from mtjax.data._census import CENSUS_COLUMNS
from mtjax.data._census import CENSUS_NUMERIC
from mtjax.data._census import census_income
from mtjax.data._dataset import MultiTaskDataset
from mtjax.data._kuairand import kuairand
from mtjax.data._store import StoredDataset
from mtjax.data._store import StoreError
from mtjax.data._store import StoreWriter
from mtjax.data._store import open_store
from mtjax.data._store import write_store
from mtjax.data._streaming import PrefetchIterator
from mtjax.data._streaming import batch_iterator
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
  "PrefetchIterator",
  "StoreError",
  "StoreWriter",
  "StoredDataset",
  "aliccp",
  "aliccp_processed",
  "aliexpress",
  "aliexpress_to_store",
  "batch_iterator",
  "batches",
  "census_income",
  "conflicting_tasks",
  "epoch_order",
  "funnel_synthetic",
  "kuairand",
  "mmoe_synthetic",
  "open_store",
  "position_bias_synthetic",
  "write_aliexpress_csv",
  "write_store",
)
