"""A Google Cloud Storage server on this machine, for the tests and benchmarks of gs:// paths:
gcp-storage-emulator's JSON API (objects in memory), sending the object generation headers that
Cloud Storage sends with every download and tensorstore (orbax's arrays) requires.

Usage: python scripts/gcs_emulator.py --port 9023 [--bucket fsmnet-test]
then point the clients at it with the variables of `client_environment(url)`. From Python,
`start(bucket)` runs it in a process of its own and returns once it answers.
"""

import argparse
import json
import os
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


def _download_with_generation(download):
  def patched(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
    try:
      saved = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(saved['generation'])
      response['x-goog-metageneration'] = str(saved['metageneration'])
    except NotFound:
      pass
    return download(request, response, storage, *args, **kwargs)
  return patched


def serve(port: int, bucket: str) -> None:
  """Serves until killed."""
  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.server import create_server
  objects.download = _download_with_generation(objects.download)
  server = create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
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
