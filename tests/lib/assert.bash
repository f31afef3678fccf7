# shellcheck shell=bash
# Small assertions for bats tests (bats-assert is not packaged for bookworm). Each prints what it saw
# before failing, so a red test explains itself in the TAP output.

fail() {
  printf '%s\n' "$*" >&2
  return 1
}

# Dumps the last `run`'s status, stdout and (with --separate-stderr) stderr.
show_run() {
  {
    echo "status: ${status:-<none>}"
    echo "--- stdout ---"
    printf '%s\n' "${output:-}"
    if [[ -n ${stderr+set} ]]; then
      echo "--- stderr ---"
      printf '%s\n' "${stderr:-}"
    fi
    echo "--------------"
  } >&2
}

assert_status() {
  [[ ${status:-} == "$1" ]] || { show_run; fail "expected exit status $1, got ${status:-<none>}"; }
}

assert_nonzero_status() {
  [[ ${status:-0} != 0 ]] || { show_run; fail "expected a non-zero exit status"; }
}

# assert_contains HAYSTACK NEEDLE [WHAT]: fixed-string containment.
assert_contains() {
  [[ $1 == *"$2"* ]] || fail "${3:-text} does not contain '$2'. It was:"$'\n'"$1"
}

# refute_contains HAYSTACK NEEDLE [WHAT]: NEEDLE must not occur (the haystack is not printed, it may be
# a secret's surroundings; only the matching lines, with the needle masked).
refute_contains() {
  local matches
  if [[ $1 == *"$2"* ]]; then
    matches=$(grep -F -- "$2" <<<"$1")
    fail "${3:-text} contains '$2' in:"$'\n'"${matches//"$2"/<FOUND>}"
  fi
}

assert_equal() {
  [[ $1 == "$2" ]] || fail "${3:-value}: expected '$2', got '$1'"
}
