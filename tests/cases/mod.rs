mod delivery;
mod documentation;
mod faults;
mod large_transaction;
mod startup_errors;
