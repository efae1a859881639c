"""Read limits, checked from headers before any voxel is allocated or decompressed."""

from __future__ import annotations

from dataclasses import dataclass

from cohortcast.data.errors import TooLargeError

MB = 2**20


@dataclass(frozen=True)
class ReadLimits:
    """Bounds checked from headers before any voxel is allocated or decompressed:
    ingestion (`ingest.max_voxels`, `ingest.max_uncompressed_mb`) and the service
    (`serve.max_voxels`, `serve.max_uncompressed_mb`) pass their own. Breaking one
    raises errors.TooLargeError. `config_section` ("ingest", "serve") only makes the
    error name the config key to raise."""

    max_voxels: int = 512 * 512 * 2048
    max_uncompressed_bytes: int = 4 * 2**30
    config_section: str = ""

    def _key(self, name: str) -> str:
        if self.config_section:
            return f"{self.config_section}.{name}"
        return f"ReadLimits.{'max_uncompressed_bytes' if name == 'max_uncompressed_mb' else name}"

    def check(self, where, voxels: int, nbytes: int, what: str) -> None:
        """Raise TooLargeError when `what` (e.g. "header declares") exceeds a limit;
        `nbytes` is the uncompressed size (pixel data, or a file read whole)."""
        if voxels > self.max_voxels:
            raise TooLargeError(
                where, f"{what} {voxels} voxels, more than the limit of {self.max_voxels} ({self._key('max_voxels')})"
            )
        if nbytes > self.max_uncompressed_bytes:
            raise TooLargeError(
                where,
                f"{what} {format_size(nbytes)}, more than the limit of "
                f"{format_size(self.max_uncompressed_bytes)} ({self._key('max_uncompressed_mb')})",
            )


def format_size(nbytes: int) -> str:
    return f"{nbytes / MB:.1f} MB" if nbytes >= MB // 10 else f"{nbytes} bytes"
