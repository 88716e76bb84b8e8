"""fsmnet-export: the serialized inference function reloads and computes what the model does;
it and the train step lower for GPUs and TPUs from this CPU."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax import export, mesh as mesh_lib, train
from fsmnet_jax.configs import tiny
from fsmnet_jax.model import build_model
from fsmnet_jax.cli import export as export_cli
from fsmnet_jax.checkpoint import save_variables
from fsmnet_jax.inference import Reconstructor

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> jax.export.Exported:
  # As a serving system loads the artifact (the command's own hint prints this call).
  return jax.export.deserialize(bytearray(path.read_bytes()))


def test_round_trip_gives_the_models_output(tmp_path, tiny_model_and_params):
  model, params = tiny_model_and_params
  path = export.save_exported(export.export_inference(model, params, 32), tmp_path / 'f.jax')
  reloaded = _load(path)
  rng = np.random.default_rng(0)
  under, aux = rng.random((2, 3, 32, 32), np.float32)
  expected = Reconstructor(model, params, batch_size=3)(under, aux)
  # One program, compiled the same way: identical in every run measured (max difference 0).
  np.testing.assert_allclose(np.asarray(reloaded.call(under, aux)), expected, rtol=0, atol=1e-6)
  # The batch is symbolic: other batch sizes run without re-exporting.
  assert np.asarray(reloaded.call(under[:1], aux[:1])).shape == (1, 32, 32)
  with pytest.raises(Exception, match='32'):  # H and W are fixed
    reloaded.call(under[:, :16, :16], aux[:, :16, :16])


def test_fixed_batch_and_every_platform(tiny_model_and_params):
  model, params = tiny_model_and_params
  exported = export.export_inference(model, params, 32, batch_size=4,
                                     platforms=('cpu', 'cuda', 'tpu'))
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  assert [a.shape for a in exported.in_avals] == [(4, 32, 32)] * 2
  with pytest.raises(ValueError, match='multiple of 8'):
    export.export_inference(model, params, 30)


def test_bf16_inference_computes_in_bfloat16_and_answers_in_float32(tiny_model_and_params):
  """Reconstructor and export with precision='bf16': bfloat16 convolutions, float32 FFTs, input
  and output, for every platform; the exported function computes what the Reconstructor does."""
  model, params = tiny_model_and_params
  rng = np.random.default_rng(0)
  under, aux = rng.random((2, 3, 32, 32), np.float32)
  in_float32 = Reconstructor(model, params, batch_size=3)(under, aux)
  in_bf16 = Reconstructor(model, params, batch_size=3, precision='bf16')(under, aux)
  assert in_bf16.dtype == np.float32
  # bfloat16 keeps 8 significant bits: a rounding is up to u = 2^-9 relative. Through the tiny
  # network the output moved by 0.9 u (relative L2; measured on AMD Zen 5), where float32
  # rounding moves it by ~1e-7: within 4 u, and far above float32's.
  u = 2.0**-9
  moved = np.linalg.norm(in_bf16 - in_float32) / np.linalg.norm(in_float32)
  assert u / 8 < moved < 4 * u, moved
  exported = export.export_inference(model, params, 32, precision='bf16',
                                     platforms=('cpu', 'cuda', 'tpu'))
  assert [a.dtype for a in (*exported.in_avals, *exported.out_avals)] == [jnp.float32] * 3
  module = exported.mlir_module()
  convolutions = [line for line in module.splitlines() if 'stablehlo.convolution' in line]
  assert sum('xbf16>' in line for line in convolutions) > len(convolutions) / 2
  ffts = [line for line in module.splitlines() if 'stablehlo.fft' in line]
  assert ffts and not any('bf16' in line for line in ffts)
  on_cpu = export.export_inference(model, params, 32, precision='bf16')
  # One program, compiled the same way: identical (measured max difference 0).
  np.testing.assert_array_equal(np.asarray(on_cpu.call(under, aux)), in_bf16)


def test_the_train_step_lowers_for_gpus_and_tpus():
  """What fsmnet-train jits, lowered for CUDA and TPU (no device needed): an op either has no
  lowering for fails here. XLA:GPU's and XLA:TPU's compilation is not checked this way."""
  config = tiny.get_config()
  mesh = train.make_mesh(config)
  state = train.abstract_train_state(config, build_model(config), mesh)
  size = (config.train.batch_size, config.data.image_size, config.data.image_size, 1)
  batch = {key: jax.ShapeDtypeStruct(size, jnp.float32, sharding=mesh_lib.rows(mesh))
           for key in train.TRAIN_KEYS}
  step = jax.jit(train.make_train_step(config, platform=None), donate_argnums=0)
  exported = jax.export.export(step, platforms=('cuda', 'tpu'))(state, batch)
  assert exported.platforms == ('cuda', 'tpu')
  assert [a.shape for a in exported.in_avals[-3:]] == [size] * 3
  assert 'stablehlo.fft' in exported.mlir_module()  # the Fourier branch, as an XLA op


def test_cli_writes_the_artifact_and_refuses_to_overwrite_it(tmp_path, capsys,
                                                            tiny_model_and_params):
  model, params = tiny_model_and_params
  checkpoint = save_variables({'params': params}, tmp_path / 'weights')
  out = tmp_path / 'fsmnet.jaxexport'
  arguments = ['--checkpoint', str(checkpoint), '--config', str(REPO / 'configs/tiny.py'),
               '--out', str(out), '--platforms', 'cpu,cuda,tpu']
  assert export_cli.main(arguments) == 0
  assert 'wrote' in capsys.readouterr().out
  assert _load(out).in_avals[0].shape[1:] == (32, 32)
  assert _load(out).platforms == ('cpu', 'cuda', 'tpu')
  before = out.read_bytes()
  assert export_cli.main(arguments) == 2
  assert 'already exists' in capsys.readouterr().err and out.read_bytes() == before
  assert export_cli.main([*arguments, '--precision', 'bf16', '--overwrite']) == 0
  assert 'reconstruction (bf16), for cpu, cuda, tpu' in capsys.readouterr().out
  assert 'xbf16>' in _load(out).mlir_module()
  assert export_cli.main([*arguments[:-2], '--platforms', 'cpu,foo']) == 2
  assert "platforms 'foo': use some of cpu, cuda, rocm, tpu" in capsys.readouterr().err
  folder = tmp_path / 'folder.jaxexport'
  (folder / 'kept').mkdir(parents=True)
  assert export_cli.main([*arguments[:-4], '--out', str(folder), '--overwrite']) == 2
  assert f'{folder}: is a folder, and this output is a file' in capsys.readouterr().err
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
  assert (folder / 'kept').is_dir()
