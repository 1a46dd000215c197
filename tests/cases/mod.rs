mod cleanup;
mod delivery;
mod documentation;
mod faults;
mod guarantees;
mod large_transaction;
mod operations;
mod startup_errors;
