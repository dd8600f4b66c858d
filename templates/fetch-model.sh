#!/bin/sh
# Fetch one model file: resume a partial download, verify its sha256, then record what was
# verified so later runs can trust the file without reading it again.
# Usage: fetch-model.sh URL DEST SHA256 SIZE MARKER [HEADER_FILE]
# URL "-" fetches nothing: the controller pushes the bytes into DEST.part (model_source =
# controller). Then the script checks an existing file, installs a complete .part, or exits
# 100 ("bytes needed") for the controller to append the rest and call it again.
set -eu
url=$1 dest=$2 sha256=$3 size=$4 marker=$5 header_file=${6:-}
part="$dest.part"

# One download per file at a time: a second run started meanwhile must not interleave.
exec 9>"$dest.lock"
flock -n 9 || { echo "another download of $dest is running" >&2; exit 75; }

file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

write_marker() {
    set -- $(stat -c '%s %Y' "$dest")
    from=$url
    [ "$url" != - ] || from="pushed by the controller"
    printf '{"sha256": "%s", "size": %s, "mtime": %s, "url": "%s"}\n' "$sha256" "$1" "$2" "$from" >"$marker.tmp"
    mv "$marker.tmp" "$marker"
}

rm -f "$marker"

# A complete file with no marker (copied in by hand, or a marker lost): check it, don't fetch.
if [ -f "$dest" ] && [ "$(file_size "$dest")" = "$size" ]; then
    echo "checking the sha256 of the existing $dest"
    if [ "$(sha256sum <"$dest" | cut -d' ' -f1)" = "$sha256" ]; then
        write_marker
        echo "existing file verified"
        exit 0
    fi
    echo "existing file does not match sha256 $sha256: fetching it again"
fi
rm -f "$dest"

# A partial file longer than the real one can only be junk.
[ "$(file_size "$part")" -le "$size" ] || rm -f "$part"

if [ "$url" = - ] && [ "$(file_size "$part")" -lt "$size" ]; then
    echo "need bytes from $(file_size "$part") of $size"
    exit 100
fi

attempt=1
while [ "$(file_size "$part")" -lt "$size" ]; do
    echo "downloading $(basename "$dest"): resuming at $(file_size "$part") of $size bytes (attempt $attempt)"
    if [ -n "$header_file" ]; then
        set -- -H "@$header_file"
    else
        set --
    fi
    curl -fsSL --connect-timeout 20 -C - -o "$part" "$@" "$url" &
    pid=$!
    ticks=0
    while kill -0 "$pid" 2>/dev/null; do
        # Short ticks: a small file is done in well under a second; progress every 15 s.
        sleep 0.2
        ticks=$((ticks + 1))
        if [ $((ticks % 75)) -eq 0 ]; then
            have=$(file_size "$part")
            echo "  $((have / 1048576)) / $((size / 1048576)) MiB ($((have * 100 / size))%)"
        fi
    done
    if wait "$pid"; then
        :
    else
        status=$?
        # 33: the server ignored the range request; start over rather than append junk.
        [ "$status" -ne 33 ] || rm -f "$part"
        echo "download interrupted (curl exit $status)" >&2
        [ "$attempt" -lt 5 ] || {
            echo "download failed: giving up after $attempt attempts (curl exit $status) at $(file_size "$part") of $size bytes; the next run resumes from there" >&2
            exit 1
        }
        attempt=$((attempt + 1))
        sleep "$attempt"
    fi
done

echo "verifying sha256"
actual=$(sha256sum <"$part" | cut -d' ' -f1)
if [ "$actual" != "$sha256" ]; then
    rm -f "$part"
    echo "sha256 mismatch: expected $sha256, got $actual (file removed)" >&2
    exit 1
fi
mv "$part" "$dest"
chmod 0644 "$dest"
write_marker
echo "model verified: $dest"
