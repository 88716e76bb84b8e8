"""The device mesh and batches on it: one `(data, model)` mesh for training, evaluation and
inference; batches split over `data`, parameters replicated."""

import pickle
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None, model_size: int = 1) -> Mesh:
  """`devices` (default: all devices of all processes) as a (data, model) mesh whose `model`
  axis, of `model_size`, is left for model parallelism."""
  devices = np.array(jax.devices() if devices is None else devices)
  if model_size < 1 or devices.size % model_size:
    raise ValueError(f'a model axis of {model_size} must divide the {devices.size} devices')
  return Mesh(devices.reshape(devices.size // model_size, model_size), ('data', 'model'))


def rows(mesh: Mesh) -> NamedSharding:
  """Arrays split along their first axis (the batch) over the `data` axis."""
  return NamedSharding(mesh, P('data'))


def process_rows(sharding: NamedSharding, num_rows: int) -> list[int]:
  """The rows of a (num_rows, ...) array split by `sharding` that this process holds, in the
  order `global_batch` takes them from its local rows (not one range where the mesh
  interleaves the processes' devices)."""
  held = sharding.addressable_devices_indices_map((num_rows,)).values()
  return sorted({row for (rows,) in held for row in range(*rows.indices(num_rows))})


def replicated(mesh: Mesh) -> NamedSharding:
  """Arrays held whole by every device."""
  return NamedSharding(mesh, P())


def global_batch(local: Any, sharding: NamedSharding) -> Any:
  """This process's rows -> global arrays split over the `data` axis."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def processes(mesh: Mesh) -> list[int]:
  """The processes that own devices of `mesh`, in order ([this one] for a mesh of local
  devices)."""
  return sorted({device.process_index for device in mesh.devices.flat})


def platform(mesh: Mesh) -> str:
  """The `jax.Device.platform` of the mesh's devices ('cpu', 'gpu', 'tpu')."""
  return mesh.devices.flat[0].platform


def gather_objects(value: Any) -> list[Any]:
  """`value` of every process, in process order, on every process (pickled: for results a
  few megabytes in size, such as an evaluation's rows)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size]))[:, 0]
  gathered = multihost_utils.process_allgather(np.pad(data, (0, int(sizes.max()) - data.size)))
  return [pickle.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes)]
