"""A Google Cloud Storage server on this machine, for the tests and benchmarks of gs:// paths:
gcp-storage-emulator's JSON API (objects in memory), with two behaviours of Cloud Storage it
lacks that tensorstore (orbax's arrays) and array_record (prepared shards) rely on.

Usage: python scripts/gcs_emulator.py --port 9023 [--bucket fsmnet-test]
then point the clients at it with the variables of `client_environment(url)`. From Python,
`start(bucket)` runs it in a process of its own and returns once it answers.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import fsspec


def client_environment(url: str) -> dict[str, str]:
  """The variables that point gcsfs (etils.epath's gs://), tensorstore and array_record's
  Cloud Storage client at `url`."""
  # gcsfs: no credentials to look for, no directory listings cached (several processes write
  # the bucket), and no gRPC bucket-type probe (the emulator lacks that API).
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'anonymous',
          'FSSPEC_GCS': json.dumps({'token': 'anon', 'use_listings_cache': False}),
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


def use_in_this_process(url: str) -> None:
  """Points this process's gcsfs and tensorstore at `url` (before their first gs:// path)."""
  environment = client_environment(url)
  os.environ.update(environment)
  fsspec.config.conf['gcs'] = json.loads(environment['FSSPEC_GCS'])  # read at fsspec's import


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(bucket: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
  """(the server process, its URL), serving `bucket`; the caller terminates the process."""
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  process = subprocess.Popen([sys.executable, __file__, '--port', str(port), '--bucket', bucket],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}', timeout=5).close()
      return process, url
    except (urllib.error.URLError, ConnectionError):
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f'the storage emulator did not start on {url}') from None
      time.sleep(0.1)


def _download_as_cloud_storage(download):
  """The emulator's download, plus two things Cloud Storage does: it sends the object's
  generation headers (tensorstore requires them), and it answers a suffix range, bytes=-N, with
  the last N bytes (array_record reads a file's tail so; the emulator sent the whole object)."""
  def patched(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
    bucket, name = request.params['bucket_name'], request.params['object_id']
    try:
      saved = storage.get_file_obj(bucket, name)
    except NotFound:
      return download(request, response, storage, *args, **kwargs)
    response['x-goog-generation'] = str(saved['generation'])
    response['x-goog-metageneration'] = str(saved['metageneration'])
    suffix = re.fullmatch(r'\s*bytes=-(\d+)\s*', request.get_header('range') or '')
    if suffix:  # as the range of the same bytes from an offset, which the emulator reads
      size = len(storage.get_file(bucket, name))
      request._request_handler.headers.replace_header(  # pylint: disable=protected-access
          'range', f'bytes={max(size - int(suffix[1]), 0)}-')
    return download(request, response, storage, *args, **kwargs)
  return patched


def serve(port: int, bucket: str) -> None:
  """Serves until killed."""
  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  objects.download = _download_as_cloud_storage(original)  # what objects.get calls (alt=media)
  for _, methods in emulator.HANDLERS:  # and the routes that name it
    methods.update({method: objects.download for method, handler in methods.items()
                    if handler is original})
  server = emulator.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  server.start()
  while True:
    time.sleep(3600)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--bucket', default='fsmnet-test')
  arguments = parser.parse_args()
  serve(arguments.port, arguments.bucket)
