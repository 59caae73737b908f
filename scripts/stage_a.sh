#!/usr/bin/env bash
# The seed's launcher (SPEC section 10), kept as a thin wrapper over `stage-a run`.
#
#   mission=挡风板安装检查 gpus=0 verify_inputs=true bash scripts/stage_a.sh
#   mission=BBU接地线检查 gpus=0,1,2,3 checkpoint=/models/qwen3-vl input_dir=/data/photos \
#       output_dir=out postprocess=true bash scripts/stage_a.sh
#
# Every variable maps to one `stage-a run` option; an unset or empty variable leaves the CLI
# default in place (`stage-a run --help` lists them). Arguments given to this script are appended
# to the command line (e.g. `--temperature 0.7`).
#
#   mission                    --mission (required)
#   gpus                       cpu -> --gpus cpu --device cpu; cpu,cpu -> two CPU processes;
#                              0 / 0,1,2,3 -> --gpus LIST (one engine process per GPU; a host
#                              without CUDA is an error, never a silent CPU run). Default: 0 when
#                              nvidia-smi is on PATH, else cpu.
#   checkpoint                 --checkpoint (omitted: the CLI's tiny random-weight demo model)
#   input_dir                  --input-dir; a path that is the mission folder itself
#                              (basename == mission) is replaced by its parent
#   output_dir                 --output-dir
#   dataset                    --dataset (bbu|rru; default from the mission)
#   prompt_profile             --prompt-profile
#   verify_inputs              --verify-inputs (boolean)
#   pass_group_number          --pass-group-number
#   fail_group_number          --fail-group-number
#   sample_seed                --sample-seed
#   batch_size_per_rank        --batch-size (model batch size: images per batch per GPU)
#   max_pixels                 --max-pixels
#   max_new_tokens             --max-new-tokens
#   temperature                --temperature (0 = greedy)
#   top_p                      --top-p
#   repetition_penalty         --repetition-penalty
#   sharding_mode              --sharding-mode (per_group|per_image)
#   keep_intermediate_outputs  boolean, default false. true: the results database stays next to
#                              the output (<output_dir>/stage_a_results.db, the CLI default), so
#                              `stage-a run --resume` / `stage-a export` work later. false: it
#                              goes to a temporary folder (under $TMPDIR) removed when the job
#                              ends with status 0, 2 or 3; after an interruption or crash it is
#                              kept, and its path printed, so the run can be resumed (the path
#                              is printed only then: never one that is about to be removed).
#                              If STAGE_A_DATABASE_URL is set, that database is used either way.
#   postprocess                --postprocess (boolean)
#   add_gt_fail_reason         --add-gt-fail-reason (boolean; BBU missions only)
#   excel_path                 --excel-path
#   log_level                  --log-level (DEBUG|INFO|WARNING|ERROR)
#   debug                      boolean: true -> `set -x` and --debug (DEBUG logs, tracebacks)
#
# Booleans accept true/false, 1/0, yes/no (any case). The stage-a program is $STAGE_A_BIN, else
# `stage-a` on PATH, else `python -m cli.main` with this repository's .venv.
#
# Exit status: a missing mission, a bad gpus list or a bad boolean -> 2 with one line on stderr
# and nothing run; otherwise the job's own status (0 ok, 2 bad input, 3 some groups not written,
# 130 interrupted). With keep_intermediate_outputs=true the script execs stage-a, so signals reach
# the job directly; otherwise it waits for the job, so deliver signals to the process group
# (Ctrl-C does) rather than to this script alone.

set -uo pipefail

PROG=stage_a.sh

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}

# parse_bool NAME DEFAULT: sets opt_NAME to true or false from the environment variable NAME.
parse_bool() {
    local name=$1 raw=${!1:-}
    [[ -z $raw ]] && raw=$2
    case "${raw,,}" in
        true | 1 | yes) printf -v "opt_$name" '%s' true ;;
        false | 0 | no) printf -v "opt_$name" '%s' false ;;
        *) die "$name must be true/false, 1/0 or yes/no; got '$raw'" ;;
    esac
}

# Quote an argument for display only when the shell would need it (keeps Chinese readable).
shell_word() {
    local s=$1
    if [[ -n $s && $s =~ ^[^][:space:]\'\"\\\$\`\;\&\|\<\>\(\)\*\?\[\#~!{}]+$ ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/\'\\\'\'}"
    fi
}

parse_bool debug false
if [[ $opt_debug == true ]]; then
    set -x
fi

mission=${mission:-}
[[ -n $mission ]] || die "mission is required, e.g.: mission=挡风板安装检查 gpus=0 bash scripts/stage_a.sh"

gpus_note=""
if [[ -z ${gpus:-} ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=0 gpus_note="(default: nvidia-smi found)"
    else
        gpus=cpu gpus_note="(default: no nvidia-smi on PATH)"
    fi
fi
gpus_re='^(cpu(,cpu)*|[0-9]+(,[0-9]+)*)$'
[[ $gpus =~ $gpus_re ]] || die "gpus must be 'cpu' (or cpu,cpu,...) or comma-separated GPU indices such as 0 or 0,1,2,3; got '$gpus'"

parse_bool verify_inputs false
parse_bool keep_intermediate_outputs false
parse_bool postprocess false
parse_bool add_gt_fail_reason false

input_note=""
if [[ -n ${input_dir:-} ]]; then
    while [[ $input_dir == */ && $input_dir != / ]]; do input_dir=${input_dir%/}; done
    if [[ ${input_dir##*/} == "$mission" && ! -d $input_dir/$mission ]]; then
        input_note="(was the mission folder $input_dir)"
        input_dir=$(dirname -- "$input_dir")
    fi
fi

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${STAGE_A_BIN:-} ]]; then
    command -v -- "$STAGE_A_BIN" >/dev/null 2>&1 || die "STAGE_A_BIN=$STAGE_A_BIN is not an executable"
    stage_a=("$STAGE_A_BIN")
elif command -v stage-a >/dev/null 2>&1; then
    stage_a=(stage-a)
elif [[ -x $repo_root/.venv/bin/python ]]; then
    stage_a=("$repo_root/.venv/bin/python" -m cli.main)
else
    die "stage-a not found: install the package (pip install -e .), or set STAGE_A_BIN"
fi

log_level=${log_level:-}
[[ $opt_debug == true ]] && log_level=DEBUG

args=(run --mission "$mission")
if [[ $gpus == cpu* ]]; then
    args+=(--gpus "$gpus" --device cpu)
else
    args+=(--gpus "$gpus")
fi
add_opt() {  # add_opt FLAG VALUE: pass FLAG VALUE when VALUE is not empty
    [[ -n $2 ]] && args+=("$1" "$2")
    return 0
}
add_opt --checkpoint "${checkpoint:-}"
add_opt --input-dir "${input_dir:-}"
add_opt --output-dir "${output_dir:-}"
add_opt --dataset "${dataset:-}"
add_opt --prompt-profile "${prompt_profile:-}"
add_opt --pass-group-number "${pass_group_number:-}"
add_opt --fail-group-number "${fail_group_number:-}"
add_opt --sample-seed "${sample_seed:-}"
add_opt --batch-size "${batch_size_per_rank:-}"
add_opt --max-pixels "${max_pixels:-}"
add_opt --max-new-tokens "${max_new_tokens:-}"
add_opt --temperature "${temperature:-}"
add_opt --top-p "${top_p:-}"
add_opt --repetition-penalty "${repetition_penalty:-}"
add_opt --sharding-mode "${sharding_mode:-}"
add_opt --log-level "$log_level"
[[ $opt_verify_inputs == true ]] && args+=(--verify-inputs)
[[ $opt_postprocess == true ]] && args+=(--postprocess)
[[ $opt_add_gt_fail_reason == true ]] && args+=(--add-gt-fail-reason)
[[ $opt_debug == true ]] && args+=(--debug)
add_opt --excel-path "${excel_path:-}"

tmp_db_dir=""
if [[ -n ${STAGE_A_DATABASE_URL:-} ]]; then
    db_shown="${STAGE_A_DATABASE_URL} (from STAGE_A_DATABASE_URL)"
    db_shown=$(printf '%s' "$db_shown" | sed -E 's#//([^:/@]+):[^@]*@#//\1:***@#')
elif [[ $opt_keep_intermediate_outputs == true ]]; then
    db_shown="${output_dir:-<output_dir>}/stage_a_results.db (kept)"
else
    tmp_db_dir=$(mktemp -d "${TMPDIR:-/tmp}/stage_a.XXXXXX") || die "cannot create a temporary folder in ${TMPDIR:-/tmp}"
    args+=(--db "$tmp_db_dir/stage_a_results.db" --temporary-db)
    db_shown="temporary, removed at the end (its path is printed only if it is kept after an interruption; keep_intermediate_outputs=true keeps it)"
fi
args+=("$@")

show() {  # show NAME VALUE [NOTE]
    local value=${2:-"(stage-a default)"}
    printf '  %-26s %s%s\n' "$1" "$value" "${3:+ $3}"
}
{
    echo "$PROG: resolved configuration"
    show mission "$mission"
    show gpus "$gpus" "$gpus_note"
    show checkpoint "${checkpoint:-}"
    show input_dir "${input_dir:-}" "$input_note"
    show output_dir "${output_dir:-}"
    show dataset "${dataset:-}"
    show prompt_profile "${prompt_profile:-}"
    show verify_inputs "$opt_verify_inputs"
    show pass_group_number "${pass_group_number:-}"
    show fail_group_number "${fail_group_number:-}"
    show sample_seed "${sample_seed:-}"
    show batch_size_per_rank "${batch_size_per_rank:-}"
    show max_pixels "${max_pixels:-}"
    show max_new_tokens "${max_new_tokens:-}"
    show temperature "${temperature:-}"
    show top_p "${top_p:-}"
    show repetition_penalty "${repetition_penalty:-}"
    show sharding_mode "${sharding_mode:-}"
    show keep_intermediate_outputs "$opt_keep_intermediate_outputs"
    show postprocess "$opt_postprocess"
    show add_gt_fail_reason "$opt_add_gt_fail_reason"
    show excel_path "${excel_path:-}"
    show log_level "$log_level"
    show debug "$opt_debug"
    show "results database" "$db_shown"
    line=""
    skip_next=false
    for word in "${stage_a[@]}" "${args[@]}"; do
        if [[ $skip_next == true ]]; then
            word="<temporary database>" skip_next=false
        elif [[ -n $tmp_db_dir && $word == --db ]]; then
            skip_next=true
        fi
        line+="$(shell_word "$word") "
    done
    show command "${line% }"
}

if [[ -z $tmp_db_dir ]]; then
    exec "${stage_a[@]}" "${args[@]}"
fi

status=0
"${stage_a[@]}" "${args[@]}" || status=$?
if [[ $status == 0 || $status == 2 || $status == 3 || ! -e $tmp_db_dir/stage_a_results.db ]]; then
    rm -rf -- "$tmp_db_dir"
else
    printf '%s: job ended with status %s; results database kept for --resume: %s\n' \
        "$PROG" "$status" "$tmp_db_dir/stage_a_results.db" >&2
fi
exit "$status"
