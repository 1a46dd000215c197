mod delivery;
mod documentation;
mod faults;
mod guarantees;
mod large_transaction;
mod startup_errors;
