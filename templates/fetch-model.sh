#!/bin/sh
# Fetch one model file: resume a partial download, verify its sha256, then record what was
# verified so later runs can trust the file without reading it again.
# Usage: fetch-model.sh URL DEST SHA256 SIZE MARKER [HEADER_FILE]
# URL "-" fetches nothing: the controller pushes the bytes into DEST.part (model_source =
# controller). Then the script checks an existing file, installs a complete .part, or exits
# 100 ("bytes needed") for the controller to append the rest and call it again.
#
# It runs as root. Every file it creates or writes (DEST, DEST.part, DEST.lock, MARKER,
# MARKER.tmp) is in DEST's or MARKER's directory, so those directories must be ones only
# root can change: not symbolic links, owned by root, not writable by group or others, on a
# path of root-owned directories nobody else can rename (issue 12: a link planted in a
# world-writable models directory made root truncate a file in /etc). Then nobody else can
# plant a link once the checks below have passed, and they cannot be raced. Those names must
# be absent or plain files of root's; anything else is refused (exit 77), not removed, so
# that someone looks at who put it there.
# shellcheck disable=SC2046  # $(stat ...) is split into set -- on purpose
set -eu
umask 077  # what this script creates is root's alone until it says otherwise
url=$1 dest=$2 sha256=$3 size=$4 marker=$5 header_file=${6:-}

REFUSED=77

refuse() {  # PATH PROBLEM FIX
    echo "refusing $1: $2. Fix: $3" >&2
    exit "$REFUSED"
}

has_bits() {  # MODE BITS: octal MODE, as stat %a prints it, has any of the octal BITS
    [ $((0$1 & 0$2)) -ne 0 ]
}

# Check a directory this script writes in (SETTING names the setting that chose it) and set
# $safe_dir to its canonical path. Every directory above it must be root's and not writable
# by others either, unless it has the sticky bit (/tmp): there nobody else can rename or
# remove what root owns.
check_dir() {  # DIR SETTING
    setting=$2
    fix="set $setting to a directory owned by root that only root can write (the default is under /opt/backchat)"
    if [ -L "$1" ]; then
        refuse "$1" "it is a symbolic link (to $(readlink -- "$1")), not a directory" \
            "set $setting to the directory itself, after checking that it is the one you mean"
    fi
    [ -d "$1" ] || refuse "$1" "it is not a directory" "create it (owned by root, mode 0755), or $fix"
    safe_dir=$(readlink -f -- "$1")
    d=$safe_dir
    while :; do
        set -- $(stat -c '%u %a' -- "$d")
        uid=$1 mode=$2
        [ "$d" = "$safe_dir" ] && what="it" || what="the directory above it, $d,"
        if [ "$uid" != 0 ]; then
            refuse "$safe_dir" "$what is owned by uid $uid, not root: that user could plant a symbolic link for root to write through" \
                "chown root: $d, or $fix"
        fi
        if has_bits "$mode" 022; then
            if [ "$d" = "$safe_dir" ] || ! has_bits "$mode" 1000; then
                if has_bits "$mode" 1000; then
                    how=$fix  # shared, like /tmp: a directory of its own is the fix
                else
                    how="chmod go-w $d, or $fix"
                fi
                refuse "$safe_dir" "$what is writable by group or others (mode $mode): they could plant a symbolic link for root to write through" "$how"
            fi
        fi
        [ "$d" != / ] || break
        d=$(dirname -- "$d")
    done
}

# A name this script creates, writes or replaces (or, for the header, reads) must be absent,
# or a regular file owned by root that nobody else can write. One it writes through must
# also have no other name: a hard link to a file elsewhere would be written to there.
check_file() {  # PATH [written-through]
    f=$1 through=${2:-}
    if [ -L "$f" ]; then
        refuse "$f" "it is a symbolic link (to $(readlink -- "$f")), which root would follow" \
            "find out who planted it, remove it (rm -- '$f') and run again"
    fi
    [ -e "$f" ] || return 0
    [ -f "$f" ] || refuse "$f" "it is not a regular file" "remove it and run again"
    set -- $(stat -c '%u %a %h' -- "$f")
    uid=$1 mode=$2 links=$3
    [ "$uid" = 0 ] || refuse "$f" "it is owned by uid $uid, not root, who could change it after it is checked" \
        "chown root: '$f' if you trust what it holds, or remove it; and run again"
    ! has_bits "$mode" 022 || refuse "$f" "it is writable by group or others (mode $mode)" \
        "chmod go-w '$f' if you trust what it holds, or remove it; and run again"
    [ -z "$through" ] || [ "$links" = 1 ] || refuse "$f" "it has $links names (hard links): writing it would change the others too" \
        "remove it (rm -- '$f') and run again"
}

if [ -n "$header_file" ]; then  # curl reads it as root and sends what it holds
    check_dir "$(dirname -- "$header_file")" stack_dir
    header_file="$safe_dir/$(basename -- "$header_file")"
    check_file "$header_file"
    [ -e "$header_file" ] || refuse "$header_file" "it does not exist" "run the deploy again"
fi
check_dir "$(dirname -- "$dest")" models_dir
dest="$safe_dir/$(basename -- "$dest")"
check_dir "$(dirname -- "$marker")" models_dir
marker="$safe_dir/$(basename -- "$marker")"
part="$dest.part"
lock="$dest.lock"
check_file "$dest"
check_file "$marker"
check_file "$part" written-through
check_file "$lock" written-through
check_file "$marker.tmp" written-through

# One download per file at a time: a second run started meanwhile must not interleave.
exec 9>>"$lock"
flock -n 9 || { echo "another download of $dest is running" >&2; exit 75; }

file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

write_marker() {
    set -- $(stat -c '%s %Y' "$dest")
    from=$url
    [ "$url" != - ] || from="pushed by the controller"
    rm -f "$marker.tmp"
    printf '{"sha256": "%s", "size": %s, "mtime": %s, "url": "%s"}\n' "$sha256" "$1" "$2" "$from" >"$marker.tmp"
    chmod 0644 "$marker.tmp"
    mv -f "$marker.tmp" "$marker"
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
chmod 0644 "$part"  # the model is readable by all the moment it has its name
mv -f "$part" "$dest"
write_marker
echo "model verified: $dest"
