"""Where a build's files live: a local directory, or any file system `pyarrow.fs` resolves from a URI
(`s3://`, `gs://`, `file://` on a path every node mounts).

A URI is shared storage: every actor can reach it, so each writes its own shard's files there. A plain
path may exist on the driver's node alone, so only the driver writes it.

Every file is written under a hidden temporary name and then moved into place (a rename on a disk; an
object store makes the whole object appear at once), so a reader never takes a half-written file for a
finished one, and a writer killed mid-file leaves only a temporary that the next claim removes.
"""

from __future__ import annotations

import fnmatch
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


class Storage:
    """Files under one root, named by '/'-separated paths relative to it."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.shared = is_uri(location)
        if self.shared:
            self.fs, self.base = pafs.FileSystem.from_uri(self.location)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), os.path.abspath(self.location)

    @property
    def name(self) -> str:
        return self.base.rstrip("/").rsplit("/", 1)[-1]

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        """True when the root is absent or holds nothing."""
        if self.fs.get_file_info(self.base).type == pafs.FileType.NotFound:
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))

    def list(self, directory: str, pattern: str = "*") -> list[str]:
        """Names (not paths) of the files directly in `directory` that match the glob `pattern`, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(directory), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern))

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as stream:
            return stream.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as stream:
                stream.write(text.encode())

        self.atomic_write(rel, write)

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        """A table without rows is written as a schema alone, no row group: `datasets` skips such a
        file, but fails on an empty row group."""

        def write(tmp: str) -> None:
            if table.num_rows:
                pq.write_table(table, tmp, filesystem=self.fs)
            else:
                with self.fs.open_output_stream(tmp) as stream:
                    pq.ParquetWriter(stream, table.schema).close()

        self.atomic_write(rel, write)

    def write_parquet_batches(self, rel: str, schema: pa.Schema, tables) -> None:
        """A Parquet file written table by table (a row group each), never whole in memory."""

        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as stream, pq.ParquetWriter(stream, schema) as writer:
                for table in tables:
                    writer.write_table(table)

        self.atomic_write(rel, write)

    def atomic_write(self, rel: str, write) -> None:
        directory, _, name = self.path(rel).rpartition("/")
        self.fs.create_dir(directory, recursive=True)
        tmp = f"{directory}/.{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"  # unique across hosts and processes
        write(tmp)
        self.fs.move(tmp, self.path(rel))

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def remove_temporaries(self) -> None:
        """Temporaries a writer killed mid-file left behind."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File and info.base_name.startswith(".") and TMP_MARK in info.base_name:
                self.fs.delete_file(info.path)
