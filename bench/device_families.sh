#!/usr/bin/env bash
# The 2026 families at their real shapes (a few layers each), on the GPU machine: for each preset config under
# bench/family_configs, write a save_pretrained-style random bf16 source, drop the page cache, export it with the
# README's launcher (torchrun, one GPU) and record seconds and GB; results in $OUT/families.tsv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/families}; mkdir -p "$OUT" "$W"
printf "preset\tsource_GB\toutput_GB\texport_s\tscale_fmt\trc\n" > "$OUT/families.tsv"
for cfg in bench/family_configs/*/; do
  name=$(basename "$cfg"); src="$W/$name-src"; out="$W/$name-fp8"
  fmt=amax; [ "$name" = deepseek-v3.2 ] && fmt=ue8m0
  python3 bench/family_sources.py "$cfg" "$src" >> "$OUT/log.txt" 2>&1
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
  t0=$(date +%s.%N)
  torchrun --nproc_per_node=1 launch/export.py source.kind=hf source.path="$src" output.dir="$out" \
    output.verify=false quant.scale_fmt=$fmt > "$OUT/$name.log" 2>&1; rc=$?
  t1=$(date +%s.%N)
  printf "%s\t%s\t%s\t%.1f\t%s\t%s\n" "$name" "$(du -sb "$src" | awk '{printf "%.2f", $1/1e9}')" \
    "$(du -sb "$out" 2>/dev/null | awk '{printf "%.2f", $1/1e9}')" "$(python3 -c "print($t1 - $t0)")" "$fmt" "$rc" \
    >> "$OUT/families.tsv"
  tail -4 "$OUT/$name.log"
  rm -rf "$src" "$out"
done
cat "$OUT/families.tsv"
