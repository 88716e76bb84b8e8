"""MetricWriter (TensorBoard events + JSONL) and the console progress bar."""

import io
import json
import platform
import time

from tensorboardX.proto import event_pb2

from fsmnet_jax.reporting import (METRICS_FILE, TENSORBOARD_DIR, MetricWriter, ProgressBar,
                                  cpu_model)


def _tensorboard_scalars(folder) -> dict[tuple[int, str], float]:
  scalars = {}
  for path in folder.glob('events.out.tfevents.*'):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length (8), its CRC (4), payload, payload CRC (4)
      length = int.from_bytes(data[offset:offset + 8], 'little')
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        scalars[(event.step, value.tag)] = value.simple_value
  return scalars


def test_metric_writer_writes_jsonl_and_tensorboard(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write(1, {'train_loss': 0.5, 'eval_psnr': float('inf')})
  writer.write(2, {'train_loss': 0.25})
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
  assert lines == [{'step': 1, 'train_loss': 0.5, 'eval_psnr': 'inf'},
                   {'step': 2, 'train_loss': 0.25}]
  scalars = _tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
  assert scalars[(1, 'train_loss')] == 0.5 and scalars[(2, 'train_loss')] == 0.25


def test_metric_writer_of_other_processes_writes_nothing(tmp_path):
  writer = MetricWriter(tmp_path, enabled=False)
  writer.write(1, {'train_loss': 0.5})
  writer.close()
  assert not list(tmp_path.iterdir())


def test_progress_bar_shows_step_loss_rate_and_eta(monkeypatch):
  clock = iter([100.0, 102.0])  # 10 steps in 2 s
  monkeypatch.setattr(time, 'monotonic', lambda: next(clock))
  stream = io.StringIO()
  bar = ProgressBar(total_steps=100, start_step=10, stream=stream, enabled=True,
                    images_per_step=4)
  bar.update(20, 0.123456)
  bar.close()
  line = stream.getvalue()
  assert 'step 20/100' in line and 'loss 0.1235' in line and 'ETA 0:16' in line
  assert '5.00 steps/s  20.0 images/s' in line


def test_progress_bar_is_quiet_when_not_a_terminal(monkeypatch):
  monkeypatch.delenv('CI', raising=False)
  stream = io.StringIO()  # not a TTY
  bar = ProgressBar(total_steps=10, start_step=0, stream=stream)
  bar.update(5, 1.0)
  bar.close()
  assert stream.getvalue() == ''


def test_cpu_model_names_the_family_model_and_vector_units(tmp_path):
  def cpuinfo(name, family, model, flags):
    entry = (f'processor\t: {{}}\nvendor_id\t: x\ncpu family\t: {family}\nmodel\t\t: {model}\n'
             f'model name\t: {name}\nflags\t\t: fpu sse2 {flags}\n\n')
    path = tmp_path / name.split()[0]
    path.write_text(entry.format(0) + entry.format(1).replace(flags, ''))
    return path
  assert cpu_model(cpuinfo('Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz', 6, 207,
                           'avx512f avx512_bf16 amx_bf16 amx_tile')) == (
      'Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz (family 6, model 207; AVX-512, '
      'AVX512-BF16, AMX)')
  assert cpu_model(cpuinfo('AMD EPYC', 25, 1, 'avx2')) == 'AMD EPYC (family 25, model 1)'
  assert cpu_model(tmp_path / 'missing') == (platform.processor() or 'unknown')
