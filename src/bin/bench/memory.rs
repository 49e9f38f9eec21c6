//! Scenario `memory`: the resident memory of `parley api` and `parley worker` run as two processes,
//! idle and under the `e2e` load (the same two phases), with each one's CPU per message.
//! `parley serve`'s memory is in the `e2e` scenario.

use crate::{
    BenchError,
    end_to_end::{self, EndToEndOptions, Topology, memory_rows, ms3, neighbour_cpu_per_message, phase_rows},
    report::Table,
};

pub async fn run(options: &EndToEndOptions) -> Result<Table, BenchError> {
    let outcome = end_to_end::run(options, Topology::Split).await?;
    let mut table = Table::new(format!(
        "memory — `parley api` + `parley worker`, the e2e load ({} messages per phase over {} conversations, \
         knowledge base of {} chunks)",
        options.messages, options.conversations, options.knowledge_chunks
    ));
    if !options.parley_env.is_empty() {
        table.note(format!("Parley's environment overridden: {}", crate::ingest::env_list(&options.parley_env)));
    }
    for p in &outcome.processes {
        memory_rows(&mut table, p, false);
    }
    for (i, phase) in outcome.phases.iter().enumerate() {
        let per_process: Vec<String> = outcome
            .processes
            .iter()
            .map(|p| format!("{} {}", p.name, ms3(p.phase_cpu[i] / phase.answered.max(1) as u32)))
            .collect();
        table.info(format!("{}: CPU per message, gross", phase.name), per_process.join(" + "));
        table.info(format!("{}: CPU per message elsewhere", phase.name), neighbour_cpu_per_message(phase));
    }
    phase_rows(&mut table, &outcome);
    Ok(table)
}
