#!/bin/bash
# luacallout-healthcheck [PATH [PORT [HOST]]]: exit 0 if GET PATH on luacallout's health
# listener answers 200, 1 otherwise. The container's HEALTHCHECK runs it.
#
# debian:bookworm-slim has no curl, wget or python, but it has bash (an Essential package),
# whose /dev/tcp redirection opens a TCP connection: that is all an HTTP/1.1 probe needs.
# The health listener answers one request per connection and closes it; it speaks plain
# HTTP unless the server runs with --secure_health_check (then this probe cannot be used).
# Defaults: PATH /live, PORT $LUACALLOUT_HEALTH_PORT or 8000, HOST 127.0.0.1.
set -u
path=${1:-/live}
port=${2:-${LUACALLOUT_HEALTH_PORT:-8000}}
host=${3:-127.0.0.1}

{ exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || { echo "cannot connect to $host:$port" >&2; exit 1; }
printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
# The status line, e.g. "HTTP/1.1 200 OK"; a listener that never answers fails after 3 s.
if ! IFS=' ' read -r -t 3 version status _ <&3; then
    echo "no answer from $host:$port$path" >&2
    exit 1
fi
exec 3<&-
if [[ $version == HTTP/1.[01] && $status == 200 ]]; then
    exit 0
fi
echo "$host:$port$path answered ${status:-nothing}" >&2
exit 1
